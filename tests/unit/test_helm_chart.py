"""The Helm chart (helm/stream-guard): lint, render, Kubernetes schemas, Settings reachability.

Rendering and linting use helm-python-sdk, Helm v4's own engine as a bundled native library (no
helm binary, no cluster). kubernetes-validate checks every rendered object against the Kubernetes
OpenAPI schemas in strict mode (unknown fields fail); custom resources (KEDA, Prometheus Operator)
have no schema there and are checked field by field instead.
"""

from __future__ import annotations

import copy
import json
import math
import re
import typing
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import UnionType
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, SecretStr

from stream_guard.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "stream-guard"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
PRODUCTION = yaml.safe_load((CHART / "ci" / "production-values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
RELEASE, NAMESPACE = "sg", "moderation"
FULLNAME = f"{RELEASE}-stream-guard"
K8S_VERSION = "1.30"

# Settings fields that only ever come from Secrets (never from values).
SECRET_FIELDS = {
    ("kafka", "sasl_password"),
    ("s3", "access_key_id"),
    ("s3", "secret_access_key"),
    ("reasoning", "api_key"),
}
# Values the chart decides instead of taking the Settings default (README: "Settings: config").
CHART_DECIDED: dict[tuple[str, ...], Any] = {
    ("policy", "path"): "/etc/stream-guard/policies/default.yaml",
    ("telemetry", "http_host"): "0.0.0.0",
    ("review", "console_host"): "0.0.0.0",
    ("review", "require_reviewer_header"): True,
    ("triton", "url"): None,
    ("kafka", "fetch_max_wait_ms"): 500,
}
# The Faust workers: Deployment suffix -> CLI command.
WORKERS = {"fast-worker": "serve", "reasoning-worker": "reason", "review-worker": "review-worker"}
# Custom resources: no Kubernetes schema; checked by check_custom_resource.
CUSTOM_GROUPS = {"keda.sh", "monitoring.coreos.com"}


# -- helpers ----------------------------------------------------------------------------------


def _helm():
    try:
        import helm_python
    except Exception as e:  # ImportError, or HelmLibraryError when the native library won't load
        pytest.skip(f"helm-python-sdk cannot run here ({type(e).__name__}: {e})")
    return helm_python


@pytest.fixture(scope="module")
def helm():
    return _helm()


@pytest.fixture(scope="module")
def chart(helm):
    with helm.Chart.load(CHART) as c:
        yield c


def render(chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, (
        f"expected one {kind} {name}, got {[d['metadata']['name'] for d in find(docs, kind)]}"
    )
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env_of(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    entries = container(deployment)["env"]
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e for e in entries}


def settings_from_env(monkeypatch, env: dict[str, str]) -> Settings:
    """What the worker sees: Settings() reading exactly this environment."""
    import os

    for name in list(os.environ):
        if name.startswith("STREAM_GUARD_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def resolve_env(
    entries: dict[str, dict[str, Any]], secrets: dict[str, dict[str, str]]
) -> dict[str, str]:
    """The kubelet's part: literal values, and secretKeyRef looked up in `secrets`."""
    out = {}
    for name, e in entries.items():
        if "value" in e:
            out[name] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            out[name] = secrets[ref["name"]][ref["key"]]
    return out


def leaves(
    model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every leaf field of Settings, nested groups walked recursively."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from leaves(ann, (*prefix, name))
        else:
            yield (*prefix, name), field


def env_name(path: tuple[str, ...]) -> str:
    return "STREAM_GUARD_" + "__".join(p.upper() for p in path)


def dig(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def plant(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def unwrap_optional(ann: Any) -> tuple[Any, bool]:
    if typing.get_origin(ann) in (typing.Union, UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        assert len(args) == 1, ann
        return args[0], True
    return ann, False


def sample_value(path: tuple[str, ...], field: Any, current: Any) -> Any:
    """A valid value different from the default, for the all-fields-populated render."""
    ann, _ = unwrap_optional(field.annotation)
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        choices = [c for c in typing.get_args(ann) if c != current]
        return choices[-1]
    if ann is bool:
        return not current
    if ann is int:
        return (current or 0) + 7 if path != ("telemetry", "metrics_port") else 9100
    if ann is float:
        return round((current or 1.0) * 1.5, 3)
    if ann is Path:
        return f"/tmp/sample/{path[-1]}"
    if origin is list:
        return ["uploads-eu", "uploads-us"]
    if origin is dict:
        return {"acme": "/etc/stream-guard/policies/default.yaml"}
    if path == ("telemetry", "http_host"):
        return "::"
    if path == ("review", "manifest"):
        return "s3://review-labels/rows"  # a folder would need reviewWorker.manifestVolume
    return f"sample-{path[-1].replace('_', '-')}"


def check_custom_resource(doc: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    kind, spec = doc["kind"], doc["spec"]
    assert doc["metadata"]["name"]
    if kind == "ScaledObject":
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        target = spec["scaleTargetRef"]
        assert target["kind"] == "Deployment"
        one(docs, "Deployment", target["name"])
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["triggers"]
        for trigger in spec["triggers"]:
            assert trigger["type"] == "kafka"
            meta = trigger["metadata"]
            for key in ("bootstrapServers", "consumerGroup", "topic", "lagThreshold"):
                assert isinstance(meta[key], str) and meta[key], key
            assert all(isinstance(v, str) for v in meta.values()), (
                "KEDA metadata values are strings"
            )
            if "authenticationRef" in trigger:
                one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    elif kind == "TriggerAuthentication":
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        for ref in spec.get("secretTargetRef", []):
            assert set(ref) == {"parameter", "name", "key"} and all(ref.values())
        for ref in spec.get("env", []):
            assert {"parameter", "name"} <= set(ref)
    elif kind == "ServiceMonitor":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        selector = spec["selector"]["matchLabels"]
        services = [
            s for s in find(docs, "Service") if selector.items() <= s["metadata"]["labels"].items()
        ]
        assert services, "the ServiceMonitor selects no Service"
        ports = {p["name"] for s in services for p in s["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] in ports, endpoint
            assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    elif kind == "PrometheusRule":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        names = []
        for group in spec["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert ("alert" in rule) != ("record" in rule), rule
                assert rule["expr"].count("(") == rule["expr"].count(")"), rule["expr"]
                assert rule["expr"].count("{") == rule["expr"].count("}"), rule["expr"]
                if "alert" in rule:
                    assert re.fullmatch(r"\d+[smh]", rule["for"])
                    assert rule["labels"]["severity"] in {"warning", "critical"}
                    assert rule["annotations"]["summary"]
                    names.append(rule["alert"])
        assert len(names) == len(set(names))
    else:
        raise AssertionError(f"unexpected custom resource {doc['apiVersion']} {kind}")


def validate_all(docs: list[dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    assert docs
    for doc in docs:
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
        if group in CUSTOM_GROUPS:
            check_custom_resource(doc, docs)
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(map(str, e.path))
            raise AssertionError(
                f"{doc['kind']} {doc['metadata']['name']}: {where}: {e.message}"
            ) from None


S3_REPOSITORY = {
    "triton": {"enabled": True},
    "modelRepository": {"s3Url": "s3://models-prod/stream-guard"},
    "secrets": {"s3": {"existingSecret": "stream-guard-s3"}},
}
# Human review on a plain cluster: labelled rows in a folder on a claim, a shadow candidate from
# the policy ConfigMap, the console without Ingress (reached through a proxy elsewhere).
REVIEW_FOLDER = {
    "config": {
        "review": {"manifest": "/var/lib/stream-guard/labels", "console_port": 9000},
        "shadow": {"policy": "/etc/stream-guard/policies/candidate.yaml"},
    },
    "policies": {"files": {"candidate.yaml": {"policy_id": "llama_guard_4", "version": "cand"}}},
    "reviewWorker": {"manifestVolume": {"persistentVolumeClaim": {"claimName": "review-labels"}}},
    "reviewConsole": {"enabled": True},
    "keda": {"enabled": True},
}
VALUE_SETS = [None, PRODUCTION, S3_REPOSITORY, REVIEW_FOLDER]
VALUE_SET_IDS = ["default", "production", "s3-repository", "review-folder"]


# -- (a) lint -----------------------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_SET_IDS)
def test_chart_lints_without_warnings(helm, values):
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


# -- (b) render and validate --------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS, ids=VALUE_SET_IDS)
def test_every_rendered_object_validates_against_kubernetes_schemas(chart, values):
    validate_all(render(chart, values))


def test_default_render_has_workers_hpa_pdb_and_no_optional_parts(chart):
    docs = render(chart)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == sorted(
        [
            ("ConfigMap", f"{FULLNAME}-policies"),
            ("Deployment", f"{FULLNAME}-fast-worker"),
            ("Deployment", f"{FULLNAME}-reasoning-worker"),
            ("Deployment", f"{FULLNAME}-review-worker"),
            ("HorizontalPodAutoscaler", f"{FULLNAME}-fast-worker"),
            ("HorizontalPodAutoscaler", f"{FULLNAME}-reasoning-worker"),
            ("HorizontalPodAutoscaler", f"{FULLNAME}-review-worker"),
            ("PodDisruptionBudget", f"{FULLNAME}-fast-worker"),
            ("PodDisruptionBudget", f"{FULLNAME}-reasoning-worker"),
            ("PodDisruptionBudget", f"{FULLNAME}-review-worker"),
            ("Service", f"{FULLNAME}-fast-worker"),
            ("Service", f"{FULLNAME}-reasoning-worker"),
            ("Service", f"{FULLNAME}-review-worker"),
            ("ServiceAccount", FULLNAME),
        ]
    ), "the review console is opt-in (it needs an authenticating proxy)"
    for d in find(docs, "Deployment"):
        assert "replicas" not in d["spec"], "the HPA owns the replica count"


def test_production_render_has_keda_triton_and_monitoring(chart):
    docs = render(chart, PRODUCTION)
    kinds = {d["kind"] for d in docs}
    assert {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"} <= kinds
    assert "HorizontalPodAutoscaler" not in kinds, "KEDA creates its own HPA"
    assert "Secret" not in kinds, "the chart never renders credentials"
    one(docs, "Deployment", f"{FULLNAME}-triton")
    one(docs, "Service", f"{FULLNAME}-triton")
    one(docs, "PodDisruptionBudget", f"{FULLNAME}-triton")


def test_keda_scales_each_worker_on_its_consumer_group_lag_with_the_kafka_secret(chart):
    docs = render(chart, PRODUCTION)
    cfg = PRODUCTION["config"]["kafka"]
    expected = {
        f"{FULLNAME}-fast-worker": ("stream-guard-fast", "guard.uploads", "500"),
        f"{FULLNAME}-reasoning-worker": ("stream-guard-reasoning", "guard.escalations", "10"),
        f"{FULLNAME}-review-worker": ("stream-guard-review", "guard.review.decisions", "20"),
    }
    for name, (group, topic, lag) in expected.items():
        so = one(docs, "ScaledObject", name)
        assert so["spec"]["scaleTargetRef"]["name"] == name
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        assert meta["bootstrapServers"] == cfg["bootstrap_servers"]
        assert (meta["consumerGroup"], meta["topic"], meta["lagThreshold"]) == (group, topic, lag)
        assert meta["offsetResetPolicy"] == "earliest"
        assert (meta["sasl"], meta["tls"]) == ("scram_sha512", "enable")
        auth = one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
        assert refs == {
            "password": ("stream-guard-kafka", "sasl-password"),
            "ca": ("stream-guard-kafka", "ca.crt"),
        }
        assert auth["spec"]["env"] == [
            {"parameter": "username", "name": "STREAM_GUARD_KAFKA__SASL_USERNAME"}
        ]
        assert "replicas" not in one(docs, "Deployment", name)["spec"]


def test_autoscaling_off_pins_the_replica_count(chart):
    docs = render(chart, {"fastWorker": {"autoscaling": {"enabled": False}, "replicaCount": 5}})
    assert one(docs, "Deployment", f"{FULLNAME}-fast-worker")["spec"]["replicas"] == 5
    assert not find(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-fast-worker")


# -- (c) every Settings field is reachable from values ---------------------------------------------


def test_values_config_mirrors_settings_one_to_one():
    def compare(model: type[BaseModel], values: dict[str, Any], prefix: tuple[str, ...]) -> None:
        fields = {name for name in model.model_fields if (*prefix[-1:], name) not in SECRET_FIELDS}
        where = ".".join(("config", *prefix))
        assert set(values) == fields, (
            f"{where}: missing {fields - set(values)}, extra {set(values) - fields}"
        )
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                compare(ann, values[name], (*prefix, name))

    compare(Settings, VALUES["config"], ())


def test_values_config_defaults_are_the_settings_defaults_except_what_the_chart_decides():
    defaults = Settings.model_construct()
    for path, _ in leaves():
        if path in SECRET_FIELDS:
            continue
        value = dig(VALUES["config"], path)
        if path in CHART_DECIDED:
            assert value == CHART_DECIDED[path], path
            continue
        default = dig(defaults.model_dump(), path)
        assert jsonable(value) == jsonable(default), (
            f"config.{'.'.join(path)}: {value!r} != Settings default {default!r}"
        )


def test_default_render_gives_the_fast_worker_an_env_var_per_settings_field(chart, monkeypatch):
    docs = render(chart)
    env = env_of(one(docs, "Deployment", f"{FULLNAME}-fast-worker"))
    stream_guard_env = {k: v for k, v in env.items() if k.startswith("STREAM_GUARD_")}
    expected_names = set()
    for path, _ in leaves():
        name = env_name(path)
        if path in SECRET_FIELDS or dig(VALUES["config"], path) is None:
            # null: not rendered, the Settings default applies (reachability: the next test).
            assert name not in env, name
            continue
        expected_names.add(name)
        assert "value" in env[name], name
    assert set(stream_guard_env) == expected_names, "env vars that are not Settings fields"

    settings = settings_from_env(monkeypatch, resolve_env(stream_guard_env, {}))
    expected = Settings.model_construct().model_dump(mode="json")
    for path, value in CHART_DECIDED.items():
        if value is not None:
            plant(expected, path, value)
    assert settings.model_dump(mode="json") == expected


def test_every_settings_field_is_reachable_from_values_including_secrets(chart, monkeypatch):
    """Populate every field (nulls too, enums to a non-default member): all reach Settings."""
    config = copy.deepcopy(VALUES["config"])
    for path, field in leaves():
        if path in SECRET_FIELDS:
            continue
        current = dig(config, path)
        if (
            current is None
            or typing.get_origin(unwrap_optional(field.annotation)[0]) is typing.Literal
        ):
            plant(config, path, sample_value(path, field, current))
    secrets = {
        "kafka-creds": {"pw": "kafka-secret"},
        "s3-creds": {"id": "AKIA-sample", "key": "s3-secret"},
        "llm-creds": {"token": "llm-secret"},
    }
    values = {
        "config": config,
        "secrets": {
            "kafka": {"existingSecret": "kafka-creds", "saslPasswordKey": "pw"},
            "s3": {
                "existingSecret": "s3-creds",
                "accessKeyIdKey": "id",
                "secretAccessKeyKey": "key",
            },
            "reasoning": {"existingSecret": "llm-creds", "apiKeyKey": "token"},
        },
        # config.triton.model_repository is set: the fast worker needs a volume to write to.
        "modelRepository": {"existingClaim": "models"},
        "reviewConsole": {"enabled": True},
    }
    docs = render(chart, values)
    validate_all(docs)
    fast = env_of(one(docs, "Deployment", f"{FULLNAME}-fast-worker"))
    reasoning = env_of(one(docs, "Deployment", f"{FULLNAME}-reasoning-worker"))
    review = env_of(one(docs, "Deployment", f"{FULLNAME}-review-worker"))
    console = env_of(one(docs, "Deployment", f"{FULLNAME}-review-console"))

    for path, _ in leaves():
        name = env_name(path)
        target = reasoning if path == ("reasoning", "api_key") else fast
        assert name in target, f"config.{'.'.join(path)} does not reach {name}"
        kind = "valueFrom" if path in SECRET_FIELDS else "value"
        assert kind in target[name], f"{name} should come from {kind}"
    assert env_name(("reasoning", "api_key")) not in fast, (
        "the API key is the reasoning worker's only"
    )

    settings = settings_from_env(monkeypatch, resolve_env(reasoning, secrets))
    expected = Settings(**config)
    got, want = settings.model_dump(mode="json"), expected.model_dump(mode="json")
    for group, field in SECRET_FIELDS:
        got[group].pop(field), want[group].pop(field)
    assert got == want
    assert settings.kafka.sasl_password == SecretStr("kafka-secret")
    assert settings.s3.access_key_id == "AKIA-sample"
    assert settings.s3.secret_access_key == SecretStr("s3-secret")
    assert settings.reasoning.api_key == SecretStr("llm-secret")

    # The review worker and the console see the same Settings, less the reasoning API key.
    want.pop("reasoning")
    for env in (review, console):
        assert env_name(("reasoning", "api_key")) not in env
        got = settings_from_env(monkeypatch, resolve_env(env, secrets)).model_dump(mode="json")
        for group, field in SECRET_FIELDS:
            got[group].pop(field, None)
        got.pop("reasoning")
        assert got == want


def test_secrets_come_only_from_existing_secrets(chart):
    docs = render(chart, PRODUCTION)
    text = json.dumps(docs)
    for d in find(docs, "Deployment"):
        for e in container(d).get("env", []):
            if e["name"] in {env_name(p) for p in SECRET_FIELDS}:
                assert set(e) == {"name", "valueFrom"}, e
                assert "secretKeyRef" in e["valueFrom"]
    fast = env_of(one(docs, "Deployment", f"{FULLNAME}-fast-worker"))
    assert fast["STREAM_GUARD_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "stream-guard-kafka",
        "key": "sasl-password",
    }
    assert "Secret" not in {d["kind"] for d in docs}
    assert "sasl-password" in text and "hunter2" not in text


@pytest.mark.parametrize("group,field", sorted(SECRET_FIELDS))
def test_inline_secret_values_are_rejected(helm, chart, group, field):
    with pytest.raises(helm.HelmValuesError, match=field):
        chart.render({"config": {group: {field: "hunter2"}}}, name=RELEASE)


def test_sasl_without_a_password_secret_fails_the_render(helm, chart):
    values = {"config": {"kafka": {"security_protocol": "SASL_SSL", "sasl_username": "u"}}}
    with pytest.raises(helm.HelmError, match="secrets.kafka.existingSecret"):
        chart.render(values, name=RELEASE)


# -- (d) values.schema.json -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "values,where",
    [
        ({"config": {"batch": {"max_size": "many"}}}, "/config/batch/max_size"),
        ({"config": {"batch": {"max_size": 0}}}, "/config/batch/max_size"),
        ({"config": {"reasoning": {"trust": "blind"}}}, "/config/reasoning/trust"),
        (
            {"config": {"reasoning": {"prompt_format": "llama_guard_3"}}},
            "/config/reasoning/prompt_format",
        ),
        ({"config": {"kafka": {"security_protocol": "SASL"}}}, "/config/kafka/security_protocol"),
        ({"config": {"kafka": {"sasl_mechanism": "GSSAPI"}}}, "/config/kafka/sasl_mechanism"),
        ({"config": {"kafka": {"topics": {"uploadz": "x"}}}}, "/config/kafka/topics"),
        ({"config": {"telemetry": {"metrics_port": 70000}}}, "/config/telemetry/metrics_port"),
        ({"config": {"shutdown_grace_s": 0}}, "/config/shutdown_grace_s"),
        ({"config": {"s3": {"allowed_buckets": "uploads"}}}, "/config/s3/allowed_buckets"),
        ({"keda": {"enabled": "yes"}}, "/keda/enabled"),
        ({"policies": {"files": {"bad name.txt": {}}}}, "'bad name.txt' does not match pattern"),
        ({"reviewWorker": {"enabled": "yes"}}, "/reviewWorker/enabled"),
        (
            {"reviewWorker": {"autoscaling": {"shadowLagThreshold": 0}}},
            "/reviewWorker/autoscaling/shadowLagThreshold",
        ),
        ({"reviewConsole": {"ingress": {"path": "review"}}}, "/reviewConsole/ingress/path"),
        (
            {"reviewConsole": {"networkPolicy": {"from": "everyone"}}},
            "/reviewConsole/networkPolicy/from",
        ),
        ({"reviewConsole": {"autoscaling": {"enabled": True}}}, "/reviewConsole"),
        ({"config": {"triton": {"image_tower": 5}}}, "/config/triton/image_tower"),
    ],
)
def test_schema_rejects_bad_values(helm, chart, values, where):
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        chart.validate_schema(values)


def test_schema_accepts_the_shipped_value_sets(chart):
    chart.validate_schema({})
    chart.validate_schema(PRODUCTION)


def test_schema_types_ranges_and_enums_match_settings():
    import annotated_types as at

    def check(model: type[BaseModel], schema: dict[str, Any], prefix: tuple[str, ...]) -> None:
        props = schema["properties"]
        assert schema["additionalProperties"] is False, prefix
        fields = {n for n in model.model_fields if (*prefix[-1:], n) not in SECRET_FIELDS}
        assert set(props) == fields, prefix
        for name in fields:
            field = model.model_fields[name]
            ann, nullable = unwrap_optional(field.annotation)
            s = props[name]
            where = ".".join((*prefix, name))
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                check(ann, s, (*prefix, name))
                continue
            types = set(s["type"]) if isinstance(s["type"], list) else {s["type"]}
            if (*prefix, name) in CHART_DECIDED and CHART_DECIDED[(*prefix, name)] is None:
                nullable = True  # null = the chart chooses (README)
            assert ("null" in types) == nullable, where
            types.discard("null")
            if typing.get_origin(ann) is typing.Literal:
                assert [v for v in s["enum"] if v is not None] == list(typing.get_args(ann)), where
                continue
            expected_type = {
                str: "string",
                Path: "string",
                bool: "boolean",
                int: "integer",
                float: "number",
            }.get(ann) or {list: "array", dict: "object"}[typing.get_origin(ann)]
            assert types == {expected_type}, where
            bounds = {}
            for m in field.metadata:
                if isinstance(m, at.Gt):
                    bounds["exclusiveMinimum"] = m.gt
                if isinstance(m, at.Ge):
                    bounds["minimum"] = m.ge
                if isinstance(m, at.Le):
                    bounds["maximum"] = m.le
            got = {k: s[k] for k in ("exclusiveMinimum", "minimum", "maximum") if k in s}
            if (*prefix, name) == ("telemetry", "metrics_port"):
                assert got == {"minimum": 1, "maximum": 65535}  # a containerPort cannot be 0
            else:
                assert got == bounds, where

    check(Settings, SCHEMA["properties"]["config"], ())


# -- (e) pods: non-root, read-only, graceful ----------------------------------------------------


@pytest.mark.parametrize("values", [None, PRODUCTION], ids=["default", "production"])
def test_containers_run_non_root_with_a_read_only_root_filesystem(chart, values):
    docs = render(chart, values)
    deployments = find(docs, "Deployment")
    # default: fast, reasoning, review worker; production adds the review console and Triton.
    assert len(deployments) == (5 if values else 3)
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        tmp = {v["name"]: v for v in pod["volumes"]}["tmp"]
        assert "emptyDir" in tmp
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["runAsNonRoot"] is True, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], c["name"]
            assert "preStop" not in c.get("lifecycle", {}), "SIGTERM goes to the process itself"
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]


@pytest.mark.parametrize(
    "values,grace", [(None, 25.0), (PRODUCTION, 45.0)], ids=["default", "production"]
)
def test_worker_grace_period_outlasts_the_drain(chart, values, grace):
    docs = render(chart, values)
    for name in WORKERS:
        pod = one(docs, "Deployment", f"{FULLNAME}-{name}")["spec"]["template"]["spec"]
        period = pod["terminationGracePeriodSeconds"]
        assert period == math.ceil(grace) + VALUES["terminationGraceMarginSeconds"]
        assert period > grace


def test_a_grace_period_shorter_than_the_drain_fails_the_render(helm, chart):
    with pytest.raises(helm.HelmError, match="must exceed config.shutdown_grace_s"):
        chart.render({"fastWorker": {"terminationGracePeriodSeconds": 20}}, name=RELEASE)


def faust_worker_routes() -> set[str]:
    """GET paths the Faust workers' HTTP server answers (kafka.create_app, not started)."""
    from stream_guard.kafka import Health, create_app

    s = Settings()
    app = create_app(s.kafka, s.telemetry, "probe-routes", Health(1.0))
    return {r.resource.canonical for r in app.web.web_app.router.routes() if r.method == "GET"}


def console_routes() -> set[str]:
    """GET paths of the review console's web app (built, not served)."""
    from stream_guard.review.console import ReviewConsole

    console = ReviewConsole(Settings())
    try:
        routes = console.web_app().router.routes()
        return {r.resource.canonical for r in routes if r.method == "GET"}
    finally:
        console.store.close()


def probe_paths(c: dict[str, Any]) -> dict[str, str]:
    probes = ("startupProbe", "livenessProbe", "readinessProbe")
    for p in probes:
        assert c[p]["httpGet"]["port"] == "http", p
    return {p: c[p]["httpGet"]["path"] for p in probes}


def test_worker_probes_use_healthz_and_readyz_on_the_metrics_port(chart):
    docs = render(chart, PRODUCTION)
    port = VALUES["config"]["telemetry"]["metrics_port"]
    routes = faust_worker_routes()
    assert {"/healthz", "/readyz", "/metrics"} <= routes
    for name, command in WORKERS.items():
        c = container(one(docs, "Deployment", f"{FULLNAME}-{name}"))
        assert c["args"] == [command, "--loglevel", "info"]
        assert c["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        assert probe_paths(c) == {
            "startupProbe": "/healthz",
            "livenessProbe": "/healthz",
            "readinessProbe": "/readyz",
        }, name
        svc = one(docs, "Service", f"{FULLNAME}-{name}")
        assert svc["spec"]["ports"] == [
            {"name": "http-metrics", "port": port, "targetPort": "http", "protocol": "TCP"}
        ]


# -- human review: the review worker and the console -------------------------------------------


def test_review_worker_reads_no_model_repository_and_no_reasoning_key(chart):
    docs = render(chart, PRODUCTION)
    review = one(docs, "Deployment", f"{FULLNAME}-review-worker")
    pod = review["spec"]["template"]["spec"]
    assert "model-repository" not in {v["name"] for v in pod["volumes"]}, "only the fast worker"
    env = env_of(review)
    assert env_name(("reasoning", "api_key")) not in env
    assert env["STREAM_GUARD_KAFKA__REVIEW_GROUP"]["value"] == "stream-guard-review"
    assert (
        env["STREAM_GUARD_REVIEW__MANIFEST"]["value"] == PRODUCTION["config"]["review"]["manifest"]
    )
    assert "review-manifest" not in {v["name"] for v in pod["volumes"]}, "S3: nothing to mount"
    one(docs, "PodDisruptionBudget", f"{FULLNAME}-review-worker")


def test_review_console_serves_on_the_console_port_with_probes_on_its_routes(chart):
    docs = render(chart, PRODUCTION)
    name = f"{FULLNAME}-review-console"
    port = VALUES["config"]["review"]["console_port"]
    deployment = one(docs, "Deployment", name)
    assert deployment["spec"]["replicas"] == 2
    c = container(deployment)
    assert c["args"] == ["review-console"], "the console command takes no --loglevel"
    assert c["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    paths = probe_paths(c)
    assert paths == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    assert set(paths.values()) | {"/metrics"} <= console_routes()
    env = env_of(deployment)
    assert env["STREAM_GUARD_REVIEW__CONSOLE_PORT"]["value"] == str(port)
    assert env["STREAM_GUARD_REVIEW__CONSOLE_HOST"]["value"] == "0.0.0.0"
    # It fetches images from S3 and publishes to Kafka with the workers' credentials, and reads
    # the policy text from the same ConfigMap; it never talks to the reasoning model.
    assert env["STREAM_GUARD_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == (
        "stream-guard-kafka"
    )
    assert env["STREAM_GUARD_S3__SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == (
        "stream-guard-s3"
    )
    assert env_name(("reasoning", "api_key")) not in env
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["policies"] == VALUES["policies"]["mountPath"]
    assert mounts["kafka-ca"] == "/etc/stream-guard/kafka-ca"
    pod = deployment["spec"]["template"]["spec"]
    assert "model-repository" not in {v["name"] for v in pod["volumes"]}

    svc = one(docs, "Service", name)
    assert svc["spec"]["ports"] == [
        {"name": "http-console", "port": port, "targetPort": "http", "protocol": "TCP"}
    ]
    assert svc["spec"]["selector"].items() <= pod_labels(deployment).items()
    one(docs, "PodDisruptionBudget", name)
    assert not find(docs, "HorizontalPodAutoscaler", name)
    assert not find(docs, "ScaledObject", name), "no lag to scale the console on"


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_the_console_port_setting_moves_the_container_and_the_service(chart):
    docs = render(chart, REVIEW_FOLDER)
    name = f"{FULLNAME}-review-console"
    deployment = one(docs, "Deployment", name)
    assert container(deployment)["ports"][0]["containerPort"] == 9000
    assert env_of(deployment)["STREAM_GUARD_REVIEW__CONSOLE_PORT"]["value"] == "9000"
    svc = one(docs, "Service", name)
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(9000, "http")]
    assert not find(docs, "Ingress") and not find(docs, "NetworkPolicy"), "both opt-in"


def test_console_ingress_routes_to_the_service_behind_the_authenticating_proxy(chart):
    docs = render(chart, PRODUCTION)
    name = f"{FULLNAME}-review-console"
    ingress = one(docs, "Ingress", name)
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [
        {"secretName": "review-example-com-tls", "hosts": ["review.example.com"]}
    ]
    (rule,) = spec["rules"]
    assert rule["host"] == "review.example.com"
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    svc = one(docs, "Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
    annotations = ingress["metadata"]["annotations"]
    assert (
        annotations["nginx.ingress.kubernetes.io/auth-response-headers"]
        == (VALUES["config"]["review"]["reviewer_header"])
    )


def test_console_network_policy_admits_only_the_named_peers_on_the_console_port(chart):
    docs = render(chart, PRODUCTION)
    name = f"{FULLNAME}-review-console"
    policy = one(docs, "NetworkPolicy", name)
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels(one(docs, "Deployment", name)).items()
    for other in WORKERS:
        assert (
            not selector.items()
            <= pod_labels(one(docs, "Deployment", f"{FULLNAME}-{other}")).items()
        ), f"the policy must not isolate the {other}"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == PRODUCTION["reviewConsole"]["networkPolicy"]["from"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]


def test_a_manifest_folder_is_mounted_on_the_review_worker_only(chart):
    docs = render(chart, REVIEW_FOLDER)
    folder = REVIEW_FOLDER["config"]["review"]["manifest"]
    review = one(docs, "Deployment", f"{FULLNAME}-review-worker")
    volumes = {v["name"]: v for v in review["spec"]["template"]["spec"]["volumes"]}
    assert volumes["review-manifest"]["persistentVolumeClaim"] == {"claimName": "review-labels"}
    assert {"name": "review-manifest", "mountPath": folder} in container(review)["volumeMounts"]
    for other in ("fast-worker", "reasoning-worker", "review-console"):
        pod = one(docs, "Deployment", f"{FULLNAME}-{other}")["spec"]["template"]["spec"]
        assert "review-manifest" not in {v["name"] for v in pod["volumes"]}, other


def test_keda_scales_the_review_worker_on_shadow_verdict_lag_only_with_a_shadow(chart):
    def triggers(values):
        so = one(render(chart, values), "ScaledObject", f"{FULLNAME}-review-worker")
        return [
            (t["metadata"]["consumerGroup"], t["metadata"]["topic"], t["metadata"]["lagThreshold"])
            for t in so["spec"]["triggers"]
        ]

    auto = VALUES["reviewWorker"]["autoscaling"]
    decisions = ("stream-guard-review", "guard.review.decisions", str(auto["lagThreshold"]))
    assert triggers(REVIEW_FOLDER) == [
        decisions,
        ("stream-guard-review", "guard.verdicts.shadow", str(auto["shadowLagThreshold"])),
    ]
    no_shadow = copy.deepcopy(REVIEW_FOLDER)
    no_shadow["config"]["shadow"]["policy"] = None
    assert triggers(no_shadow) == [decisions]


def test_shadow_candidate_is_checked_against_the_policy_configmap(helm, chart):
    values = copy.deepcopy(REVIEW_FOLDER)
    del values["policies"]
    with pytest.raises(helm.HelmError, match=re.escape("policies.files.candidate.yaml")):
        chart.render(values, name=RELEASE)


def test_review_components_can_be_turned_off(chart):
    docs = render(chart, {"reviewWorker": {"enabled": False}})
    names = {d["metadata"]["name"] for d in docs}
    assert not {n for n in names if "review" in n}


# -- Triton ---------------------------------------------------------------------------------------


def test_triton_runs_on_a_gpu_in_explicit_mode_with_health_probes(chart):
    docs = render(chart, PRODUCTION)
    name = f"{FULLNAME}-triton"
    pod = one(docs, "Deployment", name)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert "--model-control-mode=explicit" in c["args"]
    assert "--model-repository=/models" in c["args"]
    assert "--load-model=*" in c["args"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    svc = one(docs, "Service", name)
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }

    # The workers talk to this Triton; the fast worker writes policy heads to the shared claim.
    fast = one(docs, "Deployment", f"{FULLNAME}-fast-worker")
    assert env_of(fast)["STREAM_GUARD_TRITON__URL"]["value"] == f"{name}:8001"
    fast_pod = fast["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in fast_pod["volumes"]}
    assert (
        volumes["model-repository"]["persistentVolumeClaim"]["claimName"] == "stream-guard-models"
    )
    assert {"name": "model-repository", "mountPath": "/models"} in container(fast)["volumeMounts"]
    triton_volumes = {v["name"]: v for v in pod["volumes"]}
    assert triton_volumes["model-repository"]["persistentVolumeClaim"] == {
        "claimName": "stream-guard-models",
        "readOnly": True,
    }


def test_triton_reads_a_model_repository_from_s3_with_the_s3_secret(chart):
    docs = render(chart, S3_REPOSITORY)
    pod = one(docs, "Deployment", f"{FULLNAME}-triton")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert "--model-repository=s3://models-prod/stream-guard" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "stream-guard-s3"
    assert env["AWS_DEFAULT_REGION"]["value"] == "us-east-1"
    assert "model-repository" not in {v["name"] for v in pod["volumes"]}
    fast = one(docs, "Deployment", f"{FULLNAME}-fast-worker")
    assert "STREAM_GUARD_TRITON__MODEL_REPOSITORY" not in env_of(fast), "read-only deployment"


@pytest.mark.parametrize(
    "values,message",
    [
        ({"triton": {"enabled": True}}, "triton.enabled needs a model repository"),
        ({"config": {"triton": {"model_repository": "/models"}}}, "modelRepository.existingClaim"),
        ({"modelRepository": {"s3Url": "s3://a/b", "existingClaim": "c"}}, "only one of"),
        ({"config": {"telemetry": {"http_host": "127.0.0.1"}}}, "listen on 0.0.0.0"),
        (
            {"reviewConsole": {"enabled": True}, "config": {"review": {"console_host": "::1"}}},
            "config.review.console_host=::1",
        ),
        (
            {"reviewConsole": {"enabled": True}, "config": {"review": {"console_port": 0}}},
            "cannot back a Service",
        ),
        (
            {"reviewConsole": {"enabled": True, "ingress": {"enabled": True}}},
            "reviewConsole.ingress.authenticated=true",
        ),
        (
            {"reviewConsole": {"enabled": True, "networkPolicy": {"enabled": True}}},
            "reviewConsole.networkPolicy.from is empty",
        ),
        ({"config": {"review": {"manifest": "/labels"}}}, "set reviewWorker.manifestVolume"),
        ({"config": {"review": {"manifest": "labels"}}}, "an absolute folder"),
        ({"config": {"review": {"manifest": "~/labels"}}}, "an absolute folder"),
    ],
)
def test_misconfigurations_fail_the_render_with_a_fix(helm, chart, values, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        chart.render(values, name=RELEASE)


# -- policies -------------------------------------------------------------------------------------


def test_default_policy_configmap_holds_the_package_default_policy(chart):
    from stream_guard.policy.model import parse_policy

    docs = render(chart)
    cm = one(docs, "ConfigMap", f"{FULLNAME}-policies")
    policy = parse_policy(cm["data"]["default.yaml"], source="chart default")
    package_default = Path(Settings.model_construct().policy.path)
    if package_default.exists():
        packaged = parse_policy(package_default.read_text(), source=str(package_default))
        assert (policy.policy_id, policy.codes) == (packaged.policy_id, packaged.codes)
        # Byte for byte: a copy that kept the codes but lost the pack or a threshold drifted.
        assert cm["data"]["default.yaml"].strip() == package_default.read_text().strip(), (
            "helm/stream-guard/files/policies/default.yaml drifted from the package default: "
            f"copy {package_default.relative_to(ROOT)} over it"
        )
    fast = one(docs, "Deployment", f"{FULLNAME}-fast-worker")
    volumes = {v["name"]: v for v in fast["spec"]["template"]["spec"]["volumes"]}
    assert volumes["policies"]["configMap"]["name"] == cm["metadata"]["name"]
    mount = next(m for m in container(fast)["volumeMounts"] if m["name"] == "policies")
    path = PurePosixPath(VALUES["config"]["policy"]["path"])
    assert (mount["mountPath"], mount["readOnly"]) == (str(path.parent), True)
    assert path.name in cm["data"]


def test_tenant_policies_from_values_are_mounted_and_parse(chart):
    from stream_guard.policy.model import parse_policy

    docs = render(chart, PRODUCTION)
    cm = one(docs, "ConfigMap", f"{FULLNAME}-policies")
    assert set(cm["data"]) == {"default.yaml", "kids.yaml"}
    for text in cm["data"].values():
        parse_policy(text)
    env = env_of(one(docs, "Deployment", f"{FULLNAME}-fast-worker"))
    tenants = json.loads(env["STREAM_GUARD_POLICY__TENANTS"]["value"])
    assert tenants == {"kids-platform": "/etc/stream-guard/policies/kids.yaml"}
    assert parse_policy(cm["data"]["kids.yaml"]).policy_id == "kids_platform"


def test_a_tenant_policy_missing_from_the_configmap_fails_the_render(helm, chart):
    values = {"config": {"policy": {"tenants": {"acme": "/etc/stream-guard/policies/acme.yaml"}}}}
    with pytest.raises(helm.HelmError, match="policies.files.acme.yaml"):
        chart.render(values, name=RELEASE)


def test_policy_change_rolls_the_workers_only_when_asked(chart):
    def checksum(values):
        docs = render(chart, values)
        meta = one(docs, "Deployment", f"{FULLNAME}-fast-worker")["spec"]["template"]["metadata"]
        return meta.get("annotations", {}).get("checksum/policies")

    assert checksum(None) is None, "default: in-place reload, no restart"
    files = {"default.yaml": "policy_id: x"}
    a = checksum({"policies": {"restartOnChange": True}})
    b = checksum({"policies": {"restartOnChange": True, "files": files}})
    assert a and b and a != b


# -- monitoring -----------------------------------------------------------------------------------


def test_alerts_use_metrics_the_workers_export(chart):
    from prometheus_client import REGISTRY

    import stream_guard.observability  # noqa: F401  (registers the collectors)
    import stream_guard.review.console  # noqa: F401  (the review queue's gauge)

    exported = set()
    for family in REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(
            family.type, [""]
        )
        exported |= {family.name + s for s in suffixes}
    docs = render(chart, PRODUCTION)
    rule = one(docs, "PrometheusRule", FULLNAME)
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert {
        "StreamGuardEscalationRateHigh",
        "StreamGuardDeadLetterRateHigh",
        "StreamGuardConsumerLagHigh",
        "StreamGuardNotReady",
    } <= set(alerts)
    assert alerts["StreamGuardEscalationRateHigh"]["expr"].endswith("> 0.05")
    exprs = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    used = set(re.findall(r"\bstream_guard_[a-z_]+", exprs))
    assert used and used <= exported, f"rules use metrics nobody exports: {used - exported}"
    assert f'namespace="{NAMESPACE}"' in exprs

    monitor = one(docs, "ServiceMonitor", FULLNAME)
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {
        "http-metrics",
        "metrics",
        "http-console",
    }
    backlog = alerts["StreamGuardReviewBacklogHigh"]["expr"]
    assert "stream_guard_review_queue_pending" in backlog
    assert f"{FULLNAME}-review-console" in backlog
    down = alerts["StreamGuardTargetDown"]["expr"]
    for name in (*WORKERS, "review-console"):
        assert f"{FULLNAME}-{name}" in down, name


# -- image ----------------------------------------------------------------------------------------


def test_dockerfile_runs_the_cli_as_the_chart_user_without_local_extras():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    uid = int(re.search(r"^ARG UID=(\d+)$", text, re.M).group(1))
    assert re.search(r"^USER \$\{UID\}:\$\{UID\}$", text, re.M), (
        "numeric USER: runAsNonRoot can verify it"
    )
    assert uid == VALUES["podSecurityContext"]["runAsUser"] != 0
    assert re.search(r'^ENTRYPOINT \["stream-guard"\]$', text, re.M)
    installs = re.findall(r"pip install[^\n]*", text)
    assert installs and not any("[" in line for line in installs), "no extras in the image"


def test_readme_documents_every_value():
    readme = (CHART / "README.md").read_text()

    def walk(node: dict[str, Any], prefix: str) -> Iterator[str]:
        for key, value in node.items():
            path = f"{prefix}{key}"
            yield path
            if isinstance(value, dict) and key not in {"files", "tenants", "volume"}:
                if not (
                    set(value) & {"requests", "limits", "httpGet", "runAsUser", "runAsNonRoot"}
                ):
                    yield from walk(value, path + ".")

    missing = [p for p in walk(VALUES, "") if f"`{p}" not in readme]
    assert missing == []

"""Check a Kubernetes manifest against KServe's own API models (the ``kserve`` package's
``V1beta1InferenceService``, ``V1alpha1ServingRuntime`` and the Kubernetes models they hold):
every field must be one the API declares, with a value of its type. An unknown field, which the
API server would drop or refuse, is reported with its path.

    python -m handlers.tools.deploy.schema scripts/deploy/kserve/manifests/*.yaml
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

#: kind -> (apiVersion, the kserve model class name)
KINDS = {
    "InferenceService": ("serving.kserve.io/v1beta1", "V1beta1InferenceService"),
    "ServingRuntime": ("serving.kserve.io/v1alpha1", "V1alpha1ServingRuntime"),
    "ClusterServingRuntime": ("serving.kserve.io/v1alpha1", "V1alpha1ClusterServingRuntime"),
}
#: Kubernetes takes numbers where the generated models say str (quantities, int-or-string ports)
PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str, int, float), "int": (int,), "float": (int, float), "bool": (bool,),
    "object": (object,), "datetime": (str,), "date": (str,), "bytes": (str,), "ResourceQuantity": (str, int, float),
}


def _model(name: str):
    from kserve import models as kserve_models
    from kubernetes.client import models as kubernetes_models

    model = getattr(kserve_models, name, None) or getattr(kubernetes_models, name, None)
    if model is None:
        raise KeyError(f"no API model {name}")
    return model


def problems(value, type_name: str, path: str) -> list[str]:
    """What is wrong with ``value`` as an instance of the API type ``type_name``."""
    if value is None:
        return []
    if match := re.fullmatch(r"[lL]ist\[(.+)\]", type_name):
        if not isinstance(value, list):
            return [f"{path}: a list, not {type(value).__name__}"]
        return [p for i, item in enumerate(value) for p in problems(item, match.group(1), f"{path}[{i}]")]
    if match := re.fullmatch(r"dict\((\w+), (.+)\)|Dict\[(\w+), (.+)\]", type_name):
        if not isinstance(value, dict):
            return [f"{path}: a mapping, not {type(value).__name__}"]
        item_type = match.group(2) or match.group(4)
        return [p for key, item in value.items() for p in problems(item, item_type, f"{path}.{key}")]
    if type_name in PRIMITIVES:
        kinds = PRIMITIVES[type_name]
        wrong = not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds and object not in kinds)
        return [f"{path}: {type_name}, not {type(value).__name__} {value!r}"] if wrong else []
    model = _model(type_name)
    if not isinstance(value, dict):
        return [f"{path}: a {type_name} mapping, not {type(value).__name__}"]
    by_json = {json: attribute for attribute, json in model.attribute_map.items()}
    found = []
    for key, item in value.items():
        if key not in by_json:
            found.append(f"{path}.{key}: not a field of {type_name}")
        else:
            found += problems(item, model.openapi_types[by_json[key]], f"{path}.{key}")
    return found


def check_document(document: dict) -> list[str]:
    """Problems of one manifest document (an InferenceService or a ServingRuntime)."""
    kind = document.get("kind")
    if kind not in KINDS:
        return [f"kind: {kind!r} is not one of {', '.join(KINDS)}"]
    api_version, model = KINDS[kind]
    if document.get("apiVersion") != api_version:
        return [f"apiVersion: {document.get('apiVersion')!r}, not {api_version}"]
    return problems(document, model, kind)


def check_file(path: Path) -> list[str]:
    return [f"{path.name}: {p}" for doc in yaml.safe_load_all(path.read_text()) if doc for p in check_document(doc)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    found = [problem for path in p.parse_args(argv).files for problem in check_file(path)]
    print("\n".join(found) or "every manifest matches KServe's API models")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

"""Renders a kustomization offline: the subset of kustomize that deploy/kubernetes/ uses.

Supported: `resources` (files and directories with a kustomization.yaml), `namespace`,
`configMapGenerator` (files, without a hash suffix), `patches` (strategic-merge patch files,
`$patch: delete` included), `replicas` and `images`. Anything else in a kustomization is an
error, so a manifest never silently relies on a feature this renderer ignores. Where the
real kustomize is installed the tests compare both outputs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Object = dict[str, Any]

SUPPORTED = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "configMapGenerator",
    "patches",
    "replicas",
    "images",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
# Lists merged item by item on this key (as Kubernetes' patch strategies say); others replace.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "env": "name",
    "ports": "containerPort",
}


class UnsupportedKustomization(Exception):
    """The kustomization uses a feature this renderer does not implement."""


def render(directory: Path) -> list[Object]:
    """The objects `kustomize build directory` would produce (in no particular order)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise UnsupportedKustomization(f"{directory}: {sorted(unknown)}")
    objects: list[Object] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects += render(path)
        else:
            objects += [o for o in yaml.safe_load_all(path.read_text()) if o]
    for generator in kustomization.get("configMapGenerator", []):
        objects.append(_config_map(directory, generator))
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise UnsupportedKustomization(f"{directory}: patch {patch}")
        objects = _patched(objects, yaml.safe_load((directory / patch["path"]).read_text()))
    for replicas in kustomization.get("replicas", []):
        for obj in objects:
            if obj["metadata"]["name"] == replicas["name"] and "replicas" in obj.get("spec", {}):
                obj["spec"]["replicas"] = replicas["count"]
    for image in kustomization.get("images", []):
        for container in containers(objects):
            _set_image(container, image)
    namespace = kustomization.get("namespace")
    if namespace:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = namespace
    return objects


def containers(objects: list[Object]) -> list[Object]:
    """Every container (and init container) of every pod template."""
    found = []
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        found += pod.get("containers", []) + pod.get("initContainers", [])
    return found


def _config_map(directory: Path, generator: Object) -> Object:
    if not generator.get("options", {}).get("disableNameSuffixHash"):
        raise UnsupportedKustomization("configMapGenerator without disableNameSuffixHash")
    if set(generator) - {"name", "namespace", "files", "options"}:
        raise UnsupportedKustomization(f"configMapGenerator {generator}")
    data = {Path(f).name: (directory / f).read_text() for f in generator["files"]}
    metadata: Object = {"name": generator["name"]}
    if "namespace" in generator:
        metadata["namespace"] = generator["namespace"]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _patched(objects: list[Object], patch: Object) -> list[Object]:
    target = (patch["kind"], patch["metadata"]["name"])
    matches = [o for o in objects if (o["kind"], o["metadata"]["name"]) == target]
    if len(matches) != 1:
        raise UnsupportedKustomization(f"patch target {target} matches {len(matches)} objects")
    if patch.get("$patch") == "delete":
        return [o for o in objects if o is not matches[0]]
    body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
    merged = merge(matches[0], body)
    return [merged if o is matches[0] else o for o in objects]


def merge(base: Any, patch: Any, key: str = "") -> Any:
    """Strategic merge of `patch` into `base` (a new value; neither is changed)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        result = copy.deepcopy(base)
        for name, value in patch.items():
            result[name] = merge(base[name], value, name) if name in base else value
        return result
    merge_key = MERGE_KEYS.get(key)
    if isinstance(base, list) and isinstance(patch, list) and merge_key:
        items = copy.deepcopy(base)
        for item in patch:
            index = next(
                (i for i, old in enumerate(items) if old.get(merge_key) == item[merge_key]),
                None,
            )
            if index is None:
                items.append(copy.deepcopy(item))
            else:
                items[index] = merge(items[index], item)
        return items
    return copy.deepcopy(patch)


def _set_image(container: Object, image: Object) -> None:
    reference = container["image"]
    name = reference.split("@")[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    if name != image["name"]:
        return
    new = image.get("newName", name)
    if "digest" in image:
        container["image"] = f"{new}@{image['digest']}"
    elif "newTag" in image:
        container["image"] = f"{new}:{image['newTag']}"
    else:
        container["image"] = new

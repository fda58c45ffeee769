#!/usr/bin/env python3
"""Build strict JSON schemas for kubeconform from sources fetched through the Go module proxy.

Inputs are Go module zips (as left in GOMODCACHE by `go mod download`), read in place:
  --k8s ZIP            k8s.io/kubernetes: api/openapi-spec/swagger.json (built-in kinds)
  --crds ZIP::GLOB     CustomResourceDefinition YAML files inside ZIP matching GLOB
                       (fnmatch on the path inside the zip), repeatable

Output layout (kubeconform -schema-location '<out>/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json'):
  <out>/<group>/<kind>_<version>.json, with group "v1" for the core API group (kubeconform's
  .Group is the first segment of apiVersion, i.e. "v1" for "v1").

Every object schema that declares properties and says nothing about additional properties
becomes closed (additionalProperties: false), as the API server's strict field validation
does: an unknown or misspelled field fails validation. Objects marked
x-kubernetes-preserve-unknown-fields stay open. int-or-string and quantities accept both forms;
CRD `nullable` fields accept null. A CR's `metadata` is validated against the real ObjectMeta.
"""

import argparse
import copy
import fnmatch
import json
import os
import sys
import zipfile

import yaml

INT_OR_STRING = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
QUANTITY = {"anyOf": [{"type": "number"}, {"type": "string"}]}


def close_objects(node):
    """Recursively close object schemas (see module docstring)."""
    if isinstance(node, list):
        for item in node:
            close_objects(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("x-kubernetes-int-or-string") and not any(k in node for k in ("anyOf", "oneOf")):
        node.pop("type", None)
        node["anyOf"] = copy.deepcopy(INT_OR_STRING["anyOf"])
    if node.get("nullable") is True and isinstance(node.get("type"), str):
        node["type"] = [node["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        node["additionalProperties"] = False
    for key, value in node.items():
        if key == "properties" and isinstance(value, dict):
            for prop in value.values():
                close_objects(prop)
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            close_objects(value)
        elif key in ("allOf", "anyOf", "oneOf", "items") and isinstance(value, list):
            close_objects(value)
        elif key == "definitions" and isinstance(value, dict):
            for d in value.values():
                close_objects(d)


def allow_null(node):
    """The API server treats an explicit null in a built-in object as unset."""
    if isinstance(node, dict):
        t = node.get("type")
        if isinstance(t, str) and t != "null":
            node["type"] = [t, "null"]
        for v in node.values():
            allow_null(v)
    elif isinstance(node, list):
        for v in node:
            allow_null(v)


def k8s_schemas(zip_path):
    """Yield ((group, kind, version), schema) for every built-in kind in swagger.json."""
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if n.endswith("/api/openapi-spec/swagger.json")]
        if len(names) != 1:
            sys.exit(f"schemas.py: no single api/openapi-spec/swagger.json in {zip_path}")
        spec = json.loads(zf.read(names[0]))
    defs = spec["definitions"]

    # Special scalar types first, so that every reference sees the relaxed form.
    for name, d in defs.items():
        if d.get("format") == "int-or-string":
            defs[name] = copy.deepcopy(INT_OR_STRING)
        elif name.endswith(".api.resource.Quantity"):
            defs[name] = copy.deepcopy(QUANTITY)

    def refs(node, acc):
        if isinstance(node, dict):
            r = node.get("$ref")
            if isinstance(r, str):
                target = r.split("/")[-1]
                if target not in acc:
                    acc.add(target)
                    refs(defs[target], acc)
            for v in node.values():
                refs(v, acc)
        elif isinstance(node, list):
            for v in node:
                refs(v, acc)

    def rewrite(node):
        if isinstance(node, dict):
            return {
                k: ("#/definitions/" + v.split("/")[-1] if k == "$ref" and isinstance(v, str) else rewrite(v))
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name, d in defs.items():
        for gvk in d.get("x-kubernetes-group-version-kind", []):
            if not d.get("properties") or "kind" not in d["properties"]:
                continue
            needed = set()
            refs(d, needed)
            schema = rewrite(copy.deepcopy(d))
            schema["definitions"] = {n: rewrite(copy.deepcopy(defs[n])) for n in sorted(needed)}
            schema.pop("x-kubernetes-group-version-kind", None)
            close_objects(schema)
            allow_null(schema)
            yield (gvk["group"] or "v1", gvk["kind"], gvk["version"]), schema, defs


def object_meta(zip_path):
    """The closed ObjectMeta schema (with its definitions) for CR metadata."""
    for (group, kind, version), schema, _ in k8s_schemas(zip_path):
        if (group, kind, version) == ("v1", "ConfigMap", "v1"):
            meta = copy.deepcopy(schema["properties"]["metadata"])
            return meta, schema["definitions"]
    return None, {}


def crd_schemas(zip_path, pattern):
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if fnmatch.fnmatch(n, pattern)]
        if not names:
            sys.exit(f"schemas.py: nothing matches {pattern} in {zip_path}")
        for n in sorted(names):
            for doc in yaml.safe_load_all(zf.read(n)):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                spec = doc["spec"]
                for v in spec["versions"]:
                    s = (v.get("schema") or {}).get("openAPIV3Schema")
                    if s:
                        yield (spec["group"], spec["names"]["kind"], v["name"]), copy.deepcopy(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k8s", required=True)
    ap.add_argument("--crds", action="append", default=[])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    count = 0

    def write(group, kind, version, schema):
        nonlocal count
        d = os.path.join(args.out, group)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{kind.lower()}_{version}.json"), "w") as f:
            json.dump(schema, f)
        count += 1

    for (group, kind, version), schema, _ in k8s_schemas(args.k8s):
        write(group, kind, version, schema)

    meta, meta_defs = object_meta(args.k8s)
    for item in args.crds:
        zip_path, _, pattern = item.partition("::")
        for (group, kind, version), schema in crd_schemas(zip_path, pattern):
            props = schema.setdefault("properties", {})
            # The API server always accepts these at the root, declared or not.
            props.setdefault("apiVersion", {"type": "string"})
            props.setdefault("kind", {"type": "string"})
            if meta is not None:
                props["metadata"] = meta
                schema["definitions"] = meta_defs
            close_objects(schema)
            write(group, kind, version, schema)

    print(f"schemas.py: wrote {count} schemas to {args.out}")


if __name__ == "__main__":
    main()

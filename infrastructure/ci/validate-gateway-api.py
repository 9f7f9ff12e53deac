"""Validates the Gateway API documents of a rendered overlay against the CRDs.

usage: validate-gateway-api.py RENDERED_YAML CRD_DIR REST_OUT

Each document of group gateway.networking.k8s.io in RENDERED_YAML is checked
against the openAPIV3Schema of its kind and version in the CRDs of CRD_DIR
(the kubernetes-sigs/gateway-api release files), strictly: an object schema
that lists its properties admits no others, as the API server's strict field
validation (kubectl's default) would refuse them. The CEL rules
(x-kubernetes-validations) are not evaluated; tests/tests/deployment.rs checks
the ones our routes depend on. Every other document is written to REST_OUT,
for kubernetes-validate.
"""
import pathlib
import sys

import jsonschema
import yaml

GROUP = "gateway.networking.k8s.io"


def strict(schema):
    """The schema with additionalProperties: false wherever properties are listed."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def load_schemas(crd_dir):
    schemas = {}
    for path in sorted(crd_dir.glob(f"{GROUP}_*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            kind = crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schemas[(f"{GROUP}/{version['name']}", kind)] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def main() -> int:
    rendered, crd_dir, rest_out = (pathlib.Path(arg) for arg in sys.argv[1:4])
    schemas = load_schemas(crd_dir)
    if not schemas:
        print(f"no {GROUP} CRDs in {crd_dir}", file=sys.stderr)
        return 1
    rest, checked = [], 0
    for doc in yaml.safe_load_all(rendered.read_text()):
        if not doc:
            continue
        if not doc["apiVersion"].startswith(f"{GROUP}/"):
            rest.append(doc)
            continue
        key = (doc["apiVersion"], doc["kind"])
        if key not in schemas:
            print(f"{doc['kind']} {doc['metadata']['name']}: no CRD for {key}", file=sys.stderr)
            return 1
        try:
            jsonschema.validate(doc, schemas[key])
        except jsonschema.ValidationError as error:
            path = "/".join(str(p) for p in error.absolute_path)
            print(f"{doc['kind']} {doc['metadata']['name']}: {path}: {error.message}", file=sys.stderr)
            return 1
        print(f"{doc['kind']} {doc['metadata']['name']}: valid against the {doc['apiVersion']} CRD schema")
        checked += 1
    rest_out.write_text(yaml.safe_dump_all(rest, sort_keys=False))
    print(f"{rendered.name}: {checked} Gateway API documents valid, {len(rest)} others left for kubernetes-validate")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Validates skaffold.yaml against skaffold's JSON schema (no skaffold binary here).

usage: validate-skaffold.py SKAFFOLD_YAML SCHEMA_DIR

Checks the file against the schema of its own apiVersion and against the
newest schema in SCHEMA_DIR (as `skaffold fix` would upgrade it), so a
field that newer skaffold releases dropped is caught too.
"""
import json
import pathlib
import sys

import jsonschema
import yaml


def main() -> int:
    config_path, schema_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    config = yaml.safe_load(config_path.read_text())
    own = config["apiVersion"].split("/", 1)[1]
    schemas = sorted(schema_dir.glob("skaffold-v*.json"))
    newest = schemas[-1].stem.split("-", 1)[1]
    for version in dict.fromkeys([own, newest]):
        schema = json.loads((schema_dir / f"skaffold-{version}.json").read_text())
        jsonschema.validate(dict(config, apiVersion=f"skaffold/{version}"), schema)
        print(f"{config_path.name}: valid against the skaffold/{version} schema")
    return 0


if __name__ == "__main__":
    sys.exit(main())

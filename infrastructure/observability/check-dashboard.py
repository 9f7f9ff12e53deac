#!/usr/bin/env python3
"""Checks a Grafana dashboard JSON against Grafana's dashboard schema.

Grafana publishes its schema as CUE kinds; its Foundation SDK (PyPI
`grafana-foundation-sdk`) is generated from them. This script parses the
dashboard with the SDK's `Dashboard` model, panel by panel with the model of
its panel type (`timeseries`, `row`) and each target with the Prometheus
query model, writes it back, and fails unless every field we wrote survives
the round trip with the same value: a misspelled or misplaced field, or a
value of the wrong type, is not part of the schema and is dropped or changed.

Usage: check-dashboard.py DASHBOARD.json
"""

import json
import sys

from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.models import dashboard


def lost(ours, theirs, path="$"):
    """The paths where `ours` has something `theirs` does not keep."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return [f"{path}: expected an object, the schema has {type(theirs).__name__}"]
        out = []
        for key, value in ours.items():
            if key not in theirs:
                out.append(f"{path}.{key}: not in the schema")
            else:
                out += lost(value, theirs[key], f"{path}.{key}")
        return out
    if isinstance(ours, list):
        if not isinstance(theirs, list) or len(ours) != len(theirs):
            return [f"{path}: a list the schema does not keep as written"]
        out = []
        for i, (a, b) in enumerate(zip(ours, theirs)):
            out += lost(a, b, f"{path}[{i}]")
        return out
    if ours != theirs:
        return [f"{path}: {ours!r} became {theirs!r}"]
    return []


def main(path):
    with open(path) as f:
        ours = json.load(f)
    plugins.register_default_plugins()
    parsed = dashboard.Dashboard.from_json(ours)
    theirs = json.loads(json.dumps(parsed, default=lambda o: o.to_json()))
    problems = lost(ours, theirs)
    kinds = sorted({p.get("type") for p in ours.get("panels", [])})
    if problems:
        print(f"{path} does not fit Grafana's dashboard schema:\n  " + "\n  ".join(problems))
        return 1
    print(f"{path}: {len(ours['panels'])} panels ({', '.join(kinds)}) fit Grafana's dashboard schema (grafana-foundation-sdk round trip)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""Keep the settings part of the chart's values.schema.json equal to the code's settings models.

values.schema.json is written by hand, except its `definitions` of the settings models (the
`settings` blocks of the values): those are generated here from the pydantic models of
services/<svc>/settings.py and trainer/settings.py, so that `helm install` rejects a setting the
services would reject. Run it after changing a settings model:

    .venv/bin/python deploy/helm/sync_schema.py          # rewrite the definitions
    .venv/bin/python deploy/helm/sync_schema.py --check  # exit 1 if they are out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

SCHEMA_PATH = Path(__file__).resolve().parent / "puremesh" / "values.schema.json"


def settings_models() -> dict[str, type[BaseModel]]:
    """The root settings model of each `settings` block, by definition name."""
    from puremesh.services.prm.settings import PrmSettings
    from puremesh.services.rollout.settings import RolloutSettings
    from puremesh.services.verify.settings import VerifySettings
    from puremesh.trainer.settings import LearnerSettings

    return {
        "RolloutSettings": RolloutSettings,
        "PrmSettings": PrmSettings,
        "VerifySettings": VerifySettings,
        "LearnerSettings": LearnerSettings,
    }


def _rewrite(node: Any) -> Any:
    """Point $refs at the top-level `definitions` and drop the generated titles."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "title" and isinstance(value, str):
                continue
            if key == "$ref" and isinstance(value, str) and value.startswith("#/$defs/"):
                value = "#/definitions/" + value.removeprefix("#/$defs/")
            out[key] = _rewrite(value)
        return out
    if isinstance(node, list):
        return [_rewrite(item) for item in node]
    return node


def generated_definitions() -> dict[str, Any]:
    definitions: dict[str, Any] = {}
    for name, model in settings_models().items():
        schema = model.model_json_schema(mode="validation")
        for nested_name, nested in schema.pop("$defs", {}).items():
            definitions[nested_name] = _rewrite(nested)
        definitions[name] = _rewrite(schema)
    return dict(sorted(definitions.items()))


def synced(schema: dict[str, Any]) -> dict[str, Any]:
    definitions = dict(schema.get("definitions", {}))
    previous = set(schema.get("x-generated-definitions", []))
    for name in previous:
        definitions.pop(name, None)
    generated = generated_definitions()
    definitions.update(generated)
    out = dict(schema)
    out["x-generated-definitions"] = sorted(generated)
    out["definitions"] = dict(sorted(definitions.items()))
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the schema is out of date")
    args = parser.parse_args(argv)
    current = SCHEMA_PATH.read_text(encoding="utf-8")
    wanted = render(synced(json.loads(current)))
    if args.check:
        if current != wanted:
            print(f"{SCHEMA_PATH} is out of date: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        SCHEMA_PATH.write_text(wanted, encoding="utf-8")
        print(f"updated {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

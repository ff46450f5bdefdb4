"""AWS's limits on what cloudtrain sends, applied to every AWS call a test makes in this
process: moto and botocore accept a 72-character role name that IAM refuses.

Two sources: botocore's own service models (IAM's shapes carry ``max`` and ``pattern``:
a role name is at most 64 characters of ``[\\w+=,.@-]``; botocore itself checks only the
minimum), and, for EC2, whose model carries none, tests/data/contracts/ec2-limits.json
(each limit with the API reference it comes from). A call that breaks one fails the test
with the parameter, its value and the rule, before it reaches moto.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

LIMITS_FILE = Path(__file__).parent / "data" / "contracts" / "ec2-limits.json"
EC2_LIMITS: Mapping[str, Mapping[str, Any]] = json.loads(LIMITS_FILE.read_text())["limits"]

try:  # the models' patterns are Java's (\p{L}); the regex module reads them
    import regex as _regex
except ImportError:  # pragma: no cover - without it, \p patterns are skipped
    _regex = None


def _matches(pattern: str, value: str) -> bool | None:
    """Whether ``value`` is wholly ``pattern``; None when this Python cannot read it."""
    try:
        if _regex is not None:
            return _regex.fullmatch(pattern, value) is not None
        if "\\p" in pattern:
            return None
        return re.fullmatch(pattern, value) is not None
    except Exception:  # noqa: BLE001 - a pattern of another dialect: not ours to judge
        return None


def _string_problem(value: str, rule: Mapping[str, Any]) -> str | None:
    if "max" in rule and len(value) > rule["max"]:
        return f"{len(value)} characters, over {rule['max']}"
    if rule.get("ascii") and not value.isascii():
        return "not ASCII"
    if "pattern" in rule and _matches(rule["pattern"], value) is False:
        return f"does not match {rule['pattern']}"
    return None


def violations(operation: Any, params: Mapping[str, Any]) -> list[str]:
    """Each parameter of a call to ``operation`` (a botocore OperationModel) that AWS would
    refuse: ``CreateRole.RoleName 'cloudtrain-...' (72 characters, over 64)``."""
    found: list[str] = []

    def walk(shape: Any, value: Any, path: str, parent: str | None, member: str | None) -> None:
        if shape is None or value is None:
            return
        if shape.type_name == "structure" and isinstance(value, Mapping):
            for name, child in value.items():
                if name in shape.members:
                    walk(shape.members[name], child, f"{path}.{name}", shape.name, name)
        elif shape.type_name == "list" and isinstance(value, list):
            for index, item in enumerate(value):
                walk(shape.member, item, f"{path}[{index}]", parent, member)
        elif shape.type_name == "string" and isinstance(value, str):
            rules = [dict(shape.metadata)]
            for key in (f"{operation.name}.{member}", f"{parent}.{member}"):
                if key in EC2_LIMITS and operation.service_model.service_name == "ec2":
                    rules.append(dict(EC2_LIMITS[key]))
            for rule in rules:
                problem = _string_problem(value, rule)
                if problem:
                    source = f" ({rule['source']})" if "source" in rule else " (botocore's model)"
                    found.append(f"{path} {value!r}: {problem}{source}")

    walk(operation.input_shape, params, operation.name, None, None)
    return found


def install(monkeypatch: Any) -> None:
    """Check every call of every botocore client in this process against AWS's limits."""
    from botocore.client import BaseClient

    from cloudtrain.permissions import PASS_THROUGH

    PASS_THROUGH.add(__name__)  # cloudtrain's calls go through here: not the caller to record
    real = BaseClient._make_api_call

    def checked(self: Any, operation_name: str, api_params: Mapping[str, Any]) -> Any:
        operation = self._service_model.operation_model(operation_name)
        problems = violations(operation, api_params)
        assert not problems, "AWS would refuse this call: " + "; ".join(problems)
        return real(self, operation_name, api_params)

    monkeypatch.setattr(BaseClient, "_make_api_call", checked)

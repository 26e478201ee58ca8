"""template.yaml as CloudFormation deploys it: the SAM transform, with parameters applied and conditions,
Fn::If and the Rules evaluated (shared by test_template and test_security)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMPLATE = Path(__file__).resolve().parents[2] / "template.yaml"

# The three layouts every security property is asserted on.
LAYOUTS = [
    {},
    {"EndpointLayout": "split", "ApiAuth": "AWS_IAM"},
    {
        "VpcSubnetIds": "subnet-1,subnet-2",
        "DomainSubnetIds": "subnet-a,subnet-b",
        "VpcSecurityGroupIds": "sg-1",
        "OpenSearchAvailabilityZones": "2",
        "OpenSearchInstanceCount": "2",
        "NotificationSuffix": ".jpg",
    },
]


# -- the transform, with conditions evaluated ----------------------------------------------------


def transform(**parameters: str) -> dict[str, Any]:
    """The SAM transform of template.yaml, as CloudFormation would run it (code already uploaded)."""
    from samtranslator.translator.transform import transform as sam_transform
    from samtranslator.yaml_helper import yaml_parse

    template = yaml_parse(TEMPLATE.read_text())
    for resource in template["Resources"].values():
        props = resource.get("Properties", {})
        for uri in ("CodeUri", "ContentUri"):
            if uri in props:
                props[uri] = "s3://artifacts-bucket/clipsearch/code.zip"

    class NoManagedPolicies:
        def load(self) -> dict[str, str]:
            return {}

    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return dict(sam_transform(template, parameters, NoManagedPolicies()))


class Deployed:
    """The transformed template with parameters applied and Fn::If / conditions resolved."""

    def __init__(self, **parameters: str) -> None:
        self.template = transform(**parameters)
        self.params = {name: str(p.get("Default", "")) for name, p in self.template["Parameters"].items()}
        self.params.update(parameters)
        self.conditions: dict[str, bool] = {}
        for name in self.template.get("Conditions", {}):
            self.condition(name)
        self.resources = {
            name: self.resolve(res)
            for name, res in self.template["Resources"].items()
            if "Condition" not in res or self.conditions[res["Condition"]]
        }

    def condition(self, name: str) -> bool:
        if name not in self.conditions:
            self.conditions[name] = bool(self.evaluate(self.template["Conditions"][name]))
        return self.conditions[name]

    def evaluate(self, node: Any) -> Any:
        if isinstance(node, dict) and len(node) == 1:
            ((fn, arg),) = node.items()
            if fn == "Fn::Equals":
                return str(self.evaluate(arg[0])) == str(self.evaluate(arg[1]))
            if fn == "Fn::Not":
                return not self.evaluate(arg[0])
            if fn == "Fn::Or":
                return any(self.evaluate(a) for a in arg)
            if fn == "Fn::And":
                return all(self.evaluate(a) for a in arg)
            if fn == "Condition":
                return self.condition(arg)
            if fn == "Fn::Join":
                items = self.evaluate(arg[1])
                return arg[0].join(items if isinstance(items, list) else str(items).split(","))
            if fn == "Ref" and arg in self.params:
                return self.params[arg]
        return node

    def resolve(self, node: Any) -> Any:
        """Fn::If and AWS::NoValue resolved; other intrinsics kept, to be asserted on."""
        if isinstance(node, dict):
            if set(node) == {"Fn::If"}:
                name, yes, no = node["Fn::If"]
                return self.resolve(yes if self.condition(name) else no)
            out = {k: self.resolve(v) for k, v in node.items()}
            return {k: v for k, v in out.items() if v != {"Ref": "AWS::NoValue"}}
        if isinstance(node, list):
            return [self.resolve(v) for v in node if self.resolve(v) != {"Ref": "AWS::NoValue"}]
        return node

    def value(self, node: Any) -> Any:
        """A property as CloudFormation resolves it: Ref to a parameter and Fn::Select on one."""
        if isinstance(node, dict) and set(node) == {"Ref"} and node["Ref"] in self.params:
            return parameter_value(self.template, self.params, node["Ref"])
        if isinstance(node, dict) and set(node) == {"Fn::Select"}:
            index, items = node["Fn::Select"]
            return self.value(items)[int(index)]
        if isinstance(node, list):
            return [self.value(v) for v in node]
        return node

    def of_type(self, kind: str) -> dict[str, dict[str, Any]]:
        return {n: r for n, r in self.resources.items() if r["Type"] == kind}

    def statements(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every identity-policy statement: (owner, statement)."""
        for name, res in self.of_type("AWS::IAM::Role").items():
            for policy in res["Properties"].get("Policies", []):
                for st in policy["PolicyDocument"]["Statement"]:
                    yield name, st
        for name, res in self.of_type("AWS::IAM::Policy").items():
            for st in res["Properties"]["PolicyDocument"]["Statement"]:
                yield name, st


def parameter_value(template: dict[str, Any], params: dict[str, str], name: str) -> str | list[str]:
    """A parameter as CloudFormation passes it: a string, or a list for list types."""
    kind = template["Parameters"][name]["Type"]
    value = params[name]
    return value.split(",") if kind == "CommaDelimitedList" or kind.startswith("List<") else value


def rule_value(template: dict[str, Any], params: dict[str, str], node: Any) -> Any:
    """The rule-specific intrinsics ("Rules syntax" in the CloudFormation User Guide) on strings."""
    if isinstance(node, list):
        return [rule_value(template, params, v) for v in node]
    if not isinstance(node, dict):
        return str(node)
    ((fn, arg),) = node.items()
    if fn == "Ref":
        return parameter_value(template, params, arg)
    args = [rule_value(template, params, a) for a in arg]
    if fn == "Fn::Equals":
        return args[0] == args[1]
    if fn == "Fn::Not":
        return not args[0]
    if fn == "Fn::And":
        return all(args)
    if fn == "Fn::Or":
        return any(args)
    if fn == "Fn::Contains":
        return args[1] in args[0]
    if fn == "Fn::EachMemberEquals":
        return all(member == args[1] for member in args[0])
    raise AssertionError(f"{fn} is not evaluated here: extend rule_value")


def broken_rules(template: dict[str, Any], **overrides: str) -> list[str]:
    """The template's Rules that refuse these parameter values (the others at their defaults)."""
    params = {name: str(p.get("Default", "")) for name, p in template["Parameters"].items()}
    params.update(overrides)
    broken = []
    for name, rule in template.get("Rules", {}).items():
        if "RuleCondition" in rule and not rule_value(template, params, rule["RuleCondition"]):
            continue
        if not all(rule_value(template, params, a["Assert"]) for a in rule["Assertions"]):
            broken.append(name)
    return broken


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def env_of(deployed: Deployed, function: str) -> dict[str, Any]:
    return deployed.resources[function]["Properties"]["Environment"]["Variables"]

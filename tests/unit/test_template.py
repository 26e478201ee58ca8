"""template.yaml: cfn-lint, the SAM transform, the security properties, `sam validate` and `sam build`.

The properties are asserted on the transformed template (what CloudFormation deploys), with its
conditions evaluated for the parameter values under test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from support import camera
from support.template import LAYOUTS, Deployed, as_list, broken_rules, env_of, transform

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
BIN = Path(sys.executable).parent
CONTRACT_ENV = {"CLIPSEARCH_OPENSEARCH_URL", "CLIPSEARCH_OPENSEARCH_AUTH", "CLIPSEARCH_INDEX", "CLIPSEARCH_MODEL"}
GUARDED_SERVICES = ("s3:", "es:", "sagemaker:")
ALLOWED_MANAGED_POLICIES = {"AWSLambdaBasicExecutionRole", "AWSXrayWriteOnlyAccess", "AWSLambdaVPCAccessExecutionRole"}
# "Lambda quotas" (AWS Lambda Developer Guide): a deployment package is at most 50 MB zipped when uploaded
# directly (larger ones go through S3, as `sam deploy` does), and a function with all its layers at most
# 250 MB unzipped. The layer stays under the first with a 5 MiB margin, so that it could still be published
# without S3, and each function with the layer under the second with a 25 MB margin.
MAX_ARTIFACT_ZIP_BYTES = 45 * 1024 * 1024
MAX_UNZIPPED_BYTES = 225 * 1000 * 1000
MAKEFILE = ROOT / "functions" / "Makefile"
# "Lambda runtimes", deprecation table: python3.11 is deprecated on 2027-06-30 and blocks function
# creation from 2027-07-31; python3.12 is deprecated on 2028-10-31.
DEPRECATED_BY_2028 = {"python3.9", "python3.10", "python3.11"}


def tool_env() -> dict[str, str]:
    env = dict(
        os.environ,
        SAM_CLI_TELEMETRY="0",
        AWS_DEFAULT_REGION="us-east-1",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("AWS_PROFILE", None)
    return env


@pytest.fixture(scope="module")
def default() -> Deployed:
    return Deployed()


# -- linting ---------------------------------------------------------------------------------------


def test_given_template_when_cfn_lint_runs_then_no_errors_or_warnings() -> None:
    result = subprocess.run(
        [str(BIN / "cfn-lint"), str(TEMPLATE)], capture_output=True, text=True, env=tool_env(), timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_given_template_when_sam_validate_lint_runs_then_valid() -> None:
    result = subprocess.run(
        [str(BIN / "sam"), "validate", "--lint", "--template-file", str(TEMPLATE)],
        capture_output=True,
        text=True,
        env=tool_env(),
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- security properties ---------------------------------------------------------------------------


@pytest.mark.parametrize("parameters", LAYOUTS)
def test_given_any_layout_when_transformed_then_no_s3_es_or_sagemaker_action_on_a_wildcard(
    parameters: dict[str, str],
) -> None:
    deployed = Deployed(**parameters)
    checked = 0
    for owner, st in deployed.statements():
        actions = [a for a in as_list(st["Action"]) if a.startswith(GUARDED_SERVICES)]
        if not actions or st["Effect"] != "Allow":
            continue
        checked += 1
        for resource in as_list(st["Resource"]):
            text = json.dumps(resource)
            assert resource != "*" and ":::*" not in text and ":*/" not in text, (owner, actions, resource)
    assert checked >= 6


@pytest.mark.parametrize("parameters", LAYOUTS)
def test_given_any_layout_when_transformed_then_only_known_managed_policies(parameters: dict[str, str]) -> None:
    for res in Deployed(**parameters).of_type("AWS::IAM::Role").values():
        for arn in res["Properties"].get("ManagedPolicyArns", []):
            assert arn.rsplit("/", 1)[-1] in ALLOWED_MANAGED_POLICIES, arn


def test_given_default_layout_when_transformed_then_invoke_endpoint_is_scoped_to_this_endpoint(
    default: Deployed,
) -> None:
    grants = [st for _, st in default.statements() if "sagemaker:InvokeEndpoint" in as_list(st["Action"])]
    assert grants and all(as_list(st["Resource"]) == [{"Ref": "ClipEndpoint"}] for st in grants)


def test_given_split_layout_when_transformed_then_ingest_invokes_only_the_image_endpoint() -> None:
    deployed = Deployed(EndpointLayout="split")
    role = deployed.resources["IngestFunctionRole"]["Properties"]["Policies"]
    resources = [
        st["Resource"]
        for p in role
        for st in p["PolicyDocument"]["Statement"]
        if "sagemaker:InvokeEndpoint" in as_list(st["Action"])
    ]
    assert resources == [{"Ref": "ImageEndpoint"}]
    env = env_of(deployed, "IngestFunction")
    assert "CLIPSEARCH_ENDPOINT_NAME" not in env and "CLIPSEARCH_IMAGE_ENDPOINT_NAME" in env
    search_env = env_of(deployed, "SearchFunction")
    assert {"CLIPSEARCH_TEXT_ENDPOINT_NAME", "CLIPSEARCH_IMAGE_ENDPOINT_NAME"} <= set(search_env)
    models = deployed.of_type("AWS::SageMaker::Model")
    assert sorted(m["Properties"]["PrimaryContainer"]["Environment"]["ENCODE_TYPE"] for m in models.values()) == [
        "IMAGE",
        "TEXT",
    ]


def test_given_default_layout_when_transformed_then_opensearch_http_is_scoped_to_this_domain(default: Deployed) -> None:
    grants = [
        (owner, st) for owner, st in default.statements() if any(a.startswith("es:") for a in as_list(st["Action"]))
    ]
    assert [owner for owner, _ in grants] == ["OpenSearchAccessPolicy"]
    ((_, st),) = grants
    assert st["Resource"] == {"Fn::Sub": "${OpenSearchDomain.Arn}/*"}
    roles = default.resources["OpenSearchAccessPolicy"]["Properties"]["Roles"]
    assert roles == [{"Ref": "IngestFunctionRole"}, {"Ref": "SearchFunctionRole"}]


def test_given_default_layout_when_transformed_then_s3_access_is_this_bucket_only(default: Deployed) -> None:
    for owner, st in default.statements():
        if any(a.startswith("s3:") for a in as_list(st["Action"])) and owner != "SageMakerRole":
            assert "ImagesBucket" in json.dumps(st["Resource"]), (owner, st)
            assert not {a for a in as_list(st["Action"]) if a.startswith("s3:Put") or a.startswith("s3:Delete")}


def test_given_default_parameters_when_transformed_then_every_route_needs_an_api_key(default: Deployed) -> None:
    assert default.params["ApiAuth"] == "API_KEY"
    body = default.resources["SearchApi"]["Properties"]["Body"]
    routes = [(path, method, op) for path, ops in body["paths"].items() for method, op in ops.items()]
    assert {(p, m) for p, m, _ in routes if m != "options"} == {
        ("/health", "get"),
        ("/search", "get"),
        ("/search", "post"),
        ("/duplicates", "get"),
    }
    for path, method, op in routes:
        if method != "options":  # CORS preflight: browsers send it without credentials
            assert op["security"] == [{"api_key": []}], (path, method)
    plan = default.of_type("AWS::ApiGateway::UsagePlan")
    assert len(plan) == 1 and len(default.of_type("AWS::ApiGateway::ApiKey")) == 1
    (usage,) = plan.values()
    assert usage["Properties"]["ApiStages"][0]["ApiId"] == {"Ref": "SearchApi"}
    assert usage["Properties"]["Throttle"] == {
        "RateLimit": {"Ref": "ApiThrottleRateLimit"},
        "BurstLimit": {"Ref": "ApiThrottleBurstLimit"},
    }


def test_given_iam_auth_when_transformed_then_routes_need_sigv4_and_no_api_key_exists() -> None:
    deployed = Deployed(ApiAuth="AWS_IAM")
    body = deployed.resources["SearchApi"]["Properties"]["Body"]
    for method, op in body["paths"]["/search"].items():
        if method != "options":
            assert op["security"] == [{"sigv4": []}]
    assert body["securityDefinitions"]["sigv4"]["x-amazon-apigateway-authtype"] == "awsSigv4"
    assert not deployed.of_type("AWS::ApiGateway::ApiKey") and not deployed.of_type("AWS::ApiGateway::UsagePlan")


def test_given_api_when_transformed_then_binary_images_cors_and_stage_throttling(default: Deployed) -> None:
    api = default.resources["SearchApi"]["Properties"]
    assert "image/*" in api["Body"]["x-amazon-apigateway-binary-media-types"]
    options = api["Body"]["paths"]["/search"]["options"]["x-amazon-apigateway-integration"]
    assert "method.response.header.Access-Control-Allow-Origin" in options["responses"]["default"]["responseParameters"]
    (stage,) = default.of_type("AWS::ApiGateway::Stage").values()
    (setting,) = stage["Properties"]["MethodSettings"]
    assert setting["ThrottlingRateLimit"] == {"Ref": "ApiThrottleRateLimit"}
    assert setting["ThrottlingBurstLimit"] == {"Ref": "ApiThrottleBurstLimit"}
    assert env_of(default, "SearchFunction")["CLIPSEARCH_CORS_ORIGIN"] == {"Ref": "CorsAllowOrigin"}


@pytest.mark.parametrize("parameters", LAYOUTS)
def test_given_any_layout_when_transformed_then_the_api_has_exactly_one_stage_the_throttled_one(
    parameters: dict[str, str],
) -> None:
    # A Deployment with a StageName creates that stage too: SAM's "Stage", unless OpenApiVersion is set
    # ("AWS::Serverless::Api", OpenApiVersion). It would carry neither the throttling nor the usage plan.
    deployed = Deployed(**parameters)
    stages = [res["Properties"]["StageName"] for res in deployed.of_type("AWS::ApiGateway::Stage").values()]
    stages += [
        res["Properties"]["StageName"]
        for res in deployed.of_type("AWS::ApiGateway::Deployment").values()
        if "StageName" in res["Properties"]
    ]
    assert stages == ["v1"]
    assert deployed.template["Outputs"]["ApiUrl"]["Value"]["Fn::Sub"].endswith("/v1")


def test_given_bucket_when_transformed_then_private_encrypted_and_notifying_the_queue(default: Deployed) -> None:
    props = default.resources["ImagesBucket"]["Properties"]
    assert set(props["PublicAccessBlockConfiguration"].values()) == {True}
    assert len(props["PublicAccessBlockConfiguration"]) == 4
    rule = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
    assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms")
    queues = props["NotificationConfiguration"]["QueueConfigurations"]
    assert {q["Event"] for q in queues} == {"s3:ObjectCreated:*", "s3:ObjectRemoved:*"}
    assert all(q["Queue"] == {"Fn::GetAtt": ["IngestQueue", "Arn"]} and "Filter" not in q for q in queues)
    policy = default.resources["IngestQueuePolicy"]["Properties"]["PolicyDocument"]["Statement"][0]
    assert policy["Principal"] == {"Service": "s3.amazonaws.com"} and policy["Action"] == "sqs:SendMessage"
    assert {"ArnEquals", "StringEquals"} <= set(policy["Condition"])


def test_given_key_filters_when_transformed_then_notifications_are_filtered() -> None:
    deployed = Deployed(NotificationPrefix="photos/", NotificationSuffix=".jpg")
    for q in deployed.resources["ImagesBucket"]["Properties"]["NotificationConfiguration"]["QueueConfigurations"]:
        assert q["Filter"]["S3Key"]["Rules"] == [
            {"Name": "prefix", "Value": {"Ref": "NotificationPrefix"}},
            {"Name": "suffix", "Value": {"Ref": "NotificationSuffix"}},
        ]


def test_given_queue_when_transformed_then_dead_letter_queue_and_visibility_six_times_timeout(
    default: Deployed,
) -> None:
    queue = default.resources["IngestQueue"]["Properties"]
    timeout = default.resources["IngestFunction"]["Properties"]["Timeout"]
    assert queue["VisibilityTimeout"] == 6 * timeout
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["IngestDeadLetterQueue", "Arn"]},
        "maxReceiveCount": {"Ref": "IngestMaxReceiveCount"},
    }
    assert default.resources["IngestDeadLetterQueue"]["Properties"]["MessageRetentionPeriod"] == 1209600
    (mapping,) = default.of_type("AWS::Lambda::EventSourceMapping").values()
    assert mapping["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["Properties"]["EventSourceArn"] == {"Fn::GetAtt": ["IngestQueue", "Arn"]}


def test_given_event_source_when_transformed_then_it_waits_for_the_ingest_log_group(default: Deployed) -> None:
    # A message already queued would otherwise invoke the function first; Lambda creates the log group
    # itself and CloudFormation's IngestLogGroup then fails with "already exists".
    (mapping,) = default.of_type("AWS::Lambda::EventSourceMapping").values()
    assert "IngestLogGroup" in as_list(mapping.get("DependsOn", []))
    group = default.resources["IngestLogGroup"]["Properties"]["LogGroupName"]
    assert group == {"Fn::Sub": "/aws/lambda/${IngestFunction}"}


def test_given_domain_when_transformed_then_encrypted_https_tls12_and_open_only_to_the_two_roles(
    default: Deployed,
) -> None:
    props = default.resources["OpenSearchDomain"]["Properties"]
    version = default.params["OpenSearchEngineVersion"].removeprefix("OpenSearch_")
    assert tuple(int(p) for p in version.split(".")) >= (2, 19)
    assert props["EncryptionAtRestOptions"] == {"Enabled": True}
    assert props["NodeToNodeEncryptionOptions"] == {"Enabled": True}
    assert props["DomainEndpointOptions"]["EnforceHTTPS"] is True
    assert "TLS-1-2" in props["DomainEndpointOptions"]["TLSSecurityPolicy"]
    assert props["ClusterConfig"] == {
        "InstanceType": {"Ref": "OpenSearchInstanceType"},
        "InstanceCount": {"Ref": "OpenSearchInstanceCount"},
        "ZoneAwarenessEnabled": False,
    }
    assert "VPCOptions" not in props
    (st,) = props["AccessPolicies"]["Statement"]
    assert st["Principal"] == {
        "AWS": [{"Fn::GetAtt": ["IngestFunctionRole", "Arn"]}, {"Fn::GetAtt": ["SearchFunctionRole", "Arn"]}]
    }
    assert st["Resource"] != "*" and "/*" in json.dumps(st["Resource"])


def test_given_domain_when_transformed_then_an_engine_version_change_upgrades_in_place(default: Deployed) -> None:
    # Without EnableVersionUpgrade, a new EngineVersion replaces the domain and the index it holds.
    domain = default.resources["OpenSearchDomain"]
    assert domain["UpdatePolicy"] == {"EnableVersionUpgrade": True}
    assert domain["Properties"]["EngineVersion"] == {"Ref": "OpenSearchEngineVersion"}


@pytest.mark.parametrize("zones", [1, 2, 3])
def test_given_vpc_layout_when_transformed_then_the_domain_takes_one_subnet_per_zone_and_the_functions_theirs(
    zones: int,
) -> None:
    # "AWS::OpenSearchService::Domain VPCOptions": one subnet per Availability Zone the domain uses; more
    # than one without zone awareness fails with "You must specify exactly one subnet". With zone awareness,
    # AvailabilityZoneCount must equal the number of subnets (OpenSearch API Reference, ZoneAwarenessConfig).
    deployed = Deployed(
        VpcSubnetIds="subnet-f1,subnet-f2",
        VpcSecurityGroupIds="sg-1",
        DomainSubnetIds="subnet-a,subnet-b,subnet-c",
        OpenSearchAvailabilityZones=str(zones),
        OpenSearchInstanceCount=str(2 * zones),
    )
    props = deployed.resources["OpenSearchDomain"]["Properties"]
    subnets = deployed.value(props["VPCOptions"]["SubnetIds"])
    assert subnets == ["subnet-a", "subnet-b", "subnet-c"][:zones]
    assert deployed.value(props["VPCOptions"]["SecurityGroupIds"]) == ["sg-1"]
    cluster = props["ClusterConfig"]
    assert cluster["ZoneAwarenessEnabled"] is (zones > 1)
    if zones > 1:
        assert int(deployed.value(cluster["ZoneAwarenessConfig"]["AvailabilityZoneCount"])) == len(subnets)
    else:
        assert "ZoneAwarenessConfig" not in cluster
    for fn in ("IngestFunction", "SearchFunction"):
        vpc = deployed.resources[fn]["Properties"]["VpcConfig"]
        assert deployed.value(vpc["SubnetIds"]) == ["subnet-f1", "subnet-f2"]
    assert not broken_rules(deployed.template, **deployed.params)


def test_given_zone_count_when_rules_checked_then_the_data_node_count_must_be_a_multiple_of_it() -> None:
    # Two zones: "You must choose an even number of data nodes for a two Availability Zone deployment".
    # Three: a multiple of three, so that each zone holds a third of the index.
    template = transform()
    count = template["Parameters"]["OpenSearchInstanceCount"]
    for zones in (1, 2, 3):
        for nodes in range(count["MinValue"], count["MaxValue"] + 1):
            broken = broken_rules(template, OpenSearchAvailabilityZones=str(zones), OpenSearchInstanceCount=str(nodes))
            assert (not broken) == (nodes % zones == 0), (zones, nodes, broken)


@pytest.mark.parametrize(
    ("functions", "domain", "refused"),
    [("", "", False), ("subnet-f1", "subnet-a", False), ("subnet-f1", "", True), ("", "subnet-a", True)],
)
def test_given_subnets_for_only_one_side_when_rules_checked_then_refused(
    functions: str, domain: str, refused: bool
) -> None:
    # Functions outside the VPC cannot reach a VPC domain; functions inside it would need a NAT for a public one.
    broken = broken_rules(transform(), VpcSubnetIds=functions, DomainSubnetIds=domain, VpcSecurityGroupIds="sg-1")
    assert (broken == ["VpcForBothOrNeither"]) is refused and (not broken) is (not refused)


def test_given_endpoint_config_when_transformed_then_serverless_with_memory_and_concurrency_parameters(
    default: Deployed,
) -> None:
    assert default.params["EndpointMemorySizeInMB"] == "6144"
    (config,) = default.of_type("AWS::SageMaker::EndpointConfig").values()
    (variant,) = config["Properties"]["ProductionVariants"]
    assert variant["ServerlessConfig"] == {
        "MemorySizeInMB": {"Ref": "EndpointMemorySizeInMB"},
        "MaxConcurrency": {"Ref": "EndpointMaxConcurrency"},
    }
    assert len(default.of_type("AWS::SageMaker::Endpoint")) == 1
    (model,) = default.of_type("AWS::SageMaker::Model").values()
    container = model["Properties"]["PrimaryContainer"]
    assert container["ModelDataUrl"] == {"Ref": "ModelDataUrl"} and container["Image"] == {"Ref": "InferenceImageUri"}
    assert container["Environment"]["SAGEMAKER_PROGRAM"] == "inference.py"
    assert "ENCODE_TYPE" not in container["Environment"]


def test_given_default_parameters_when_checked_then_ingest_leaves_slots_of_the_shared_endpoint_to_search(
    default: Deployed,
) -> None:
    # Ingest handles a batch one record at a time, so it holds at most IngestMaxConcurrency endpoint slots.
    grants = {
        owner: st["Resource"]
        for owner, st in default.statements()
        if "sagemaker:InvokeEndpoint" in as_list(st["Action"])
    }
    assert grants["IngestFunctionRole"] in as_list(grants["SearchFunctionRole"])  # one endpoint, shared
    (mapping,) = default.of_type("AWS::Lambda::EventSourceMapping").values()
    assert mapping["Properties"]["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "IngestMaxConcurrency"}}
    (config,) = default.of_type("AWS::SageMaker::EndpointConfig").values()
    (variant,) = config["Properties"]["ProductionVariants"]
    assert variant["ServerlessConfig"]["MaxConcurrency"] == {"Ref": "EndpointMaxConcurrency"}
    ingest, endpoint = int(default.params["IngestMaxConcurrency"]), int(default.params["EndpointMaxConcurrency"])
    assert ingest < endpoint, "ingest would take every slot of the endpoint that search needs"


def test_given_provisioned_concurrency_when_rules_checked_then_it_never_exceeds_max_concurrency() -> None:
    # SageMaker: ProvisionedConcurrency "should be less than or equal to MaxConcurrency", both 1-200
    # ("ProductionVariantServerlessConfig", SageMaker API Reference). Every allowed pair is checked.
    template = transform()
    provisioned = template["Parameters"]["EndpointProvisionedConcurrency"]
    maximum = template["Parameters"]["EndpointMaxConcurrency"]
    assert (maximum["MinValue"], maximum["MaxValue"]) == (1, 200)
    assert int(provisioned["Default"]) <= int(maximum["Default"])
    assert broken_rules(template) == []
    for p in provisioned["AllowedValues"]:
        assert 0 <= int(p) <= 200
        for m in range(maximum["MinValue"], maximum["MaxValue"] + 1):
            broken = broken_rules(template, EndpointProvisionedConcurrency=str(p), EndpointMaxConcurrency=str(m))
            assert (not broken) == (int(p) <= m), (p, m, broken)


@pytest.mark.parametrize("layout", ["single", "split"])
def test_given_provisioned_concurrency_when_transformed_then_the_text_endpoint_keeps_that_many_warm(
    layout: str,
) -> None:
    deployed = Deployed(EndpointLayout=layout, EndpointProvisionedConcurrency="2")
    config = deployed.resources["ClipEndpointConfig"]["Properties"]["ProductionVariants"][0]["ServerlessConfig"]
    assert config["ProvisionedConcurrency"] == {"Ref": "EndpointProvisionedConcurrency"}
    assert config["MaxConcurrency"] == {"Ref": "EndpointMaxConcurrency"}
    text_endpoint = "CLIPSEARCH_TEXT_ENDPOINT_NAME" if layout == "split" else "CLIPSEARCH_ENDPOINT_NAME"
    assert env_of(deployed, "SearchFunction")[text_endpoint] == {"Fn::GetAtt": ["ClipEndpoint", "EndpointName"]}


def test_given_functions_when_transformed_then_environment_follows_the_contract(default: Deployed) -> None:
    for fn in ("IngestFunction", "SearchFunction"):
        props = default.resources[fn]["Properties"]
        env = props["Environment"]["Variables"]
        assert CONTRACT_ENV | {"CLIPSEARCH_ENDPOINT_NAME", "CLIPSEARCH_DIM"} <= set(env), fn
        assert env["CLIPSEARCH_OPENSEARCH_AUTH"] == "sigv4"
        assert props["Handler"] == "app.handler"
        assert props["TracingConfig"] == {"Mode": "Active"}
    assert env_of(default, "SearchFunction")["CLIPSEARCH_BUCKET"] == {"Ref": "ImagesBucket"}


def lambda_runtime(deployed: Deployed) -> str:
    runtimes = {deployed.resources[fn]["Properties"]["Runtime"] for fn in ("IngestFunction", "SearchFunction")}
    assert len(runtimes) == 1, runtimes
    return runtimes.pop()


def runtime_interpreter(runtime: str) -> Path | None:
    """This machine's interpreter for a Lambda runtime (python3.12 -> a working python3.12), if any.

    A pyenv shim is on PATH for every installed version but fails unless that version is selected,
    so each candidate is run once.
    """
    version = runtime.removeprefix("python")
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    on_path = shutil.which(runtime)
    candidates = [Path(on_path)] if on_path else []
    candidates += sorted(pyenv_root.glob(f"versions/{version}.*/bin/{runtime}"), reverse=True)
    for candidate in candidates:
        probe = subprocess.run(
            [str(candidate), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    return None


def test_given_runtime_when_checked_then_supported_past_2028_and_the_layer_is_built_for_it(default: Deployed) -> None:
    runtime = lambda_runtime(default)
    assert runtime not in DEPRECATED_BY_2028, f"{runtime} is deprecated before 2028 (Lambda runtimes)"
    (layer,) = default.of_type("AWS::Lambda::LayerVersion").values()  # SAM suffixes its logical id
    assert layer["Properties"]["CompatibleRuntimes"] == [runtime]
    wheels = re.search(r"--python-version\s+(\S+)", MAKEFILE.read_text())
    assert wheels and f"python{wheels.group(1)}" == runtime, "functions/Makefile builds the layer for another Python"


def test_given_runtime_when_checked_then_this_machine_has_its_interpreter(default: Deployed) -> None:
    runtime = lambda_runtime(default)
    assert runtime_interpreter(runtime), (
        f"no working {runtime} on this machine: the built functions are imported under it below "
        f"(install it, for example `pyenv install {runtime.removeprefix('python')}`)"
    )


def test_given_outputs_when_read_then_each_has_a_description() -> None:
    outputs = transform()["Outputs"]
    assert {
        "ApiUrl",
        "ApiKeyId",
        "ImagesBucketName",
        "OpenSearchDomainEndpoint",
        "EndpointName",
        "IngestQueueUrl",
        "TransformModelName",
    } <= set(outputs)
    assert all(o.get("Description") for o in outputs.values())


# -- sam build -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build_dir = tmp_path_factory.mktemp("sam-build")
    result = subprocess.run(
        [str(BIN / "sam"), "build", "--template-file", str(TEMPLATE), "--build-dir", str(build_dir)],
        capture_output=True,
        text=True,
        env=tool_env(),
        timeout=900,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return build_dir


def zipped_size(folder: Path, tmp: Path) -> int:
    archive = shutil.make_archive(str(tmp / folder.name), "zip", folder)
    with zipfile.ZipFile(archive) as z:
        assert z.namelist()
    return Path(archive).stat().st_size


def unzipped_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def test_given_sam_build_when_done_then_functions_hold_code_only_and_layer_the_dependencies(
    built: Path, tmp_path: Path
) -> None:
    layer = built / "DependenciesLayer"
    for fn in ("IngestFunction", "SearchFunction"):
        names = {p.name for p in (built / fn).iterdir()}
        assert {"app.py", "clipsearch", "model_code"} <= names and not {"torch", "boto3", "data"} & names
        assert not (built / fn / "clipsearch" / "data").exists()
        assert zipped_size(built / fn, tmp_path) < 1024 * 1024
        assert unzipped_size(built / fn) + unzipped_size(layer) < MAX_UNZIPPED_BYTES
    names = {p.name for p in (layer / "python").iterdir()}
    assert {
        "numpy",
        "PIL",
        "pillow_heif",
        "rawpy",
        "opensearchpy",
        "aws_lambda_powertools",
        "requests_aws4auth",
    } <= names
    assert not {"torch", "boto3", "botocore", "clip"} & names
    assert zipped_size(layer, tmp_path) < MAX_ARTIFACT_ZIP_BYTES


def run_like_lambda(built: Path, function: str, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`code` under the runtime's Python as Lambda runs it: the function, then the layer, then the runtime's
    boto3; no site-packages."""
    runtime_libs = cwd / "runtime"
    runtime_libs.mkdir()
    import boto3
    import botocore
    import s3transfer

    for module in (boto3, botocore, s3transfer):
        (runtime_libs / module.__name__).symlink_to(Path(module.__file__ or "").parent)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",  # pragma: allowlist secret
        "PYTHONPATH": os.pathsep.join(
            [str(built / function), str(built / "DependenciesLayer" / "python"), str(runtime_libs)]
        ),
        "POWERTOOLS_SERVICE_NAME": "clipsearch",
        "POWERTOOLS_METRICS_NAMESPACE": "clipsearch",
        "CLIPSEARCH_ENDPOINT_NAME": "clip",
        "CLIPSEARCH_OPENSEARCH_URL": "https://search-x.es.amazonaws.com",
        "CLIPSEARCH_INDEX": "images",
        "CLIPSEARCH_MODEL": "RN50",
        "CLIPSEARCH_BUCKET": "b",
    }
    runtime = lambda_runtime(Deployed())
    python = runtime_interpreter(runtime)
    assert python, f"no working {runtime} on this machine: the layer's wheels are built for it"
    return subprocess.run(
        [str(python), "-S", "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize("function", ["IngestFunction", "SearchFunction"])
def test_given_built_function_when_imported_like_lambda_then_it_starts_without_torch(
    built: Path, tmp_path: Path, function: str
) -> None:
    code = (
        "import sys, importlib.util\n"
        "import app\n"
        "assert importlib.util.find_spec('torch') is None, 'torch is importable'\n"
        "assert 'torch' not in sys.modules and callable(app.handler)\n"
        "print('started')\n"
    )
    result = run_like_lambda(built, function, code, tmp_path)
    assert result.returncode == 0 and "started" in result.stdout, result.stdout + result.stderr


def test_given_built_ingest_function_when_it_decodes_camera_raw_then_the_preview_is_read_or_the_reason_given(
    built: Path, tmp_path: Path
) -> None:
    # The ingest Lambda's one decode (clipsearch.aws.ingest calls it with the key), under the layer's rawpy.
    (tmp_path / "DSC_0003.DNG").write_bytes(camera.dng(camera.shape("yellow", "triangle", seed=3)))
    (tmp_path / "DSC_0007.nef").write_bytes(camera.dng(None))
    code = (
        "from pathlib import Path\n"
        "from model_code.inference import decode_for_model\n"
        "for name in ('DSC_0003.DNG', 'DSC_0007.nef'):\n"
        "    try:\n"
        "        decoded = decode_for_model(Path(name).read_bytes(), name=name)\n"
        "        print(name, decoded.width, decoded.height, decoded.image.mode)\n"
        "    except ValueError as e:\n"
        "        print(name, e)\n"
    )
    result = run_like_lambda(built, "IngestFunction", code, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # The 256 px preview, not the 64 px raw image; the file without one is refused with the local reason.
    assert result.stdout.splitlines() == [
        "DSC_0003.DNG 256 256 RGB",
        "DSC_0007.nef RAW file without an embedded JPEG preview",
    ]


def test_given_ingest_function_when_transformed_then_its_timeout_fits_two_records_of_a_batch_at_their_worst(
    default: Deployed,
) -> None:
    # The ingest handler starts each record of a batch only when its worst case fits the time left
    # (aws_ingest): its read and decode, then one endpoint request and the bulk write it shares with the
    # records before it. A timeout below one record's worst case would fail every record into the
    # dead-letter queue; one below two would, whenever S3 and the decode run slow, bring batches down to
    # one record per invocation and give up what batching saves.
    from clipsearch.aws.ingest import DECODE_S, END_RESERVE_S, RECORD_MIN_S, S3_CALL_S

    timeout = default.resources["IngestFunction"]["Properties"]["Timeout"]
    assert timeout >= RECORD_MIN_S + (S3_CALL_S + DECODE_S) + END_RESERVE_S


def test_given_split_layout_when_transformed_then_only_the_text_endpoint_is_provisioned() -> None:
    deployed = Deployed(EndpointLayout="split", EndpointProvisionedConcurrency="2")
    image = deployed.resources["ImageEndpointConfig"]["Properties"]["ProductionVariants"][0]["ServerlessConfig"]
    assert "ProvisionedConcurrency" not in image


# -- multi-AZ replicas, VPC rules, the serving image's Python ------------------------------------


class FakeIndicesClient:
    """The two index calls OpenSearchIndex makes on open: get_mapping (404 for a new index) and create."""

    def __init__(self) -> None:
        self.created: dict[str, Any] = {}

    def get_mapping(self, index: str) -> dict[str, Any]:
        from opensearchpy import exceptions

        if index not in self.created:
            raise exceptions.NotFoundError(404, "index_not_found_exception", {})
        return {index: {"mappings": self.created[index]["mappings"]}}

    def create(self, index: str, body: dict[str, Any]) -> dict[str, Any]:
        self.created[index] = body
        return {"acknowledged": True}


class FakeOpenSearch:
    def __init__(self) -> None:
        self.indices = FakeIndicesClient()


def deployed_config(deployed: Deployed, function: str, role: str) -> Any:
    """The function's configuration as its code reads it, the template's references given stand-in values."""
    from clipsearch.aws import config as aws_config

    env = {name: value if isinstance(value, str) else "stand-in" for name, value in env_of(deployed, function).items()}
    env.update(
        CLIPSEARCH_MODEL=deployed.params["ModelSpec"],
        CLIPSEARCH_DIM=deployed.params["ModelDimension"],
        CLIPSEARCH_INDEX=deployed.params["IndexName"],
    )
    return aws_config.from_env(role, env)


@pytest.mark.parametrize("zones", [1, 2, 3])
def test_given_zone_count_when_the_index_is_created_then_a_multi_az_domain_keeps_a_replica(zones: int) -> None:
    # Zone awareness spreads replica shards over the zones; with none, losing a zone loses the index's
    # shards there ("Don't enable zone awareness if your cluster has no replica index shards",
    # ZoneAwarenessConfig in the OpenSearch Service API Reference).
    from clipsearch.aws import config as aws_config

    deployed = Deployed(OpenSearchAvailabilityZones=str(zones), OpenSearchInstanceCount=str(zones))
    for function, role in (("IngestFunction", "ingest"), ("SearchFunction", "search")):
        config = deployed_config(deployed, function, role)
        client = FakeOpenSearch()
        assert aws_config.make_index(config, client=client).opened is not None  # opened: created on first use
        (body,) = client.indices.created.values()
        assert body["settings"]["number_of_replicas"] == (1 if zones > 1 else 0), (function, zones)


@pytest.mark.parametrize(("value", "replicas"), [("", 0), ("0", 0), ("1", 1), ("2", 2)])
def test_given_replicas_setting_when_configured_then_read(value: str, replicas: int) -> None:
    from clipsearch.aws import config as aws_config

    env = {
        "CLIPSEARCH_ENDPOINT_NAME": "e",
        "CLIPSEARCH_OPENSEARCH_URL": "https://x",
        "CLIPSEARCH_INDEX": "i",
        "CLIPSEARCH_MODEL": "RN50",
        "CLIPSEARCH_OPENSEARCH_REPLICAS": value,
    }
    assert aws_config.from_env("ingest", env).replicas == replicas


@pytest.mark.parametrize("value", ["one", "-1", "1.5"])
def test_given_a_bad_replicas_setting_when_configured_then_config_error_naming_it(value: str) -> None:
    from clipsearch.aws import config as aws_config
    from clipsearch.errors import ConfigError

    env = {
        "CLIPSEARCH_ENDPOINT_NAME": "e",
        "CLIPSEARCH_OPENSEARCH_URL": "https://x",
        "CLIPSEARCH_INDEX": "i",
        "CLIPSEARCH_MODEL": "RN50",
        "CLIPSEARCH_OPENSEARCH_REPLICAS": value,
    }
    with pytest.raises(ConfigError, match="CLIPSEARCH_OPENSEARCH_REPLICAS"):
        aws_config.from_env("ingest", env)


@pytest.mark.parametrize(("groups", "refused"), [("sg-1", False), ("sg-1,sg-2", False), ("", True)])
def test_given_a_vpc_when_rules_checked_then_security_groups_are_required(groups: str, refused: bool) -> None:
    # The groups go to the Lambdas' VpcConfig and the domain's VPCOptions; an empty list passes [""].
    broken = broken_rules(transform(), VpcSubnetIds="subnet-f1", DomainSubnetIds="subnet-a", VpcSecurityGroupIds=groups)
    assert broken == (["VpcNeedsSecurityGroups"] if refused else [])


def test_given_no_vpc_when_rules_checked_then_no_security_group_is_needed() -> None:
    assert not broken_rules(transform(), VpcSubnetIds="", DomainSubnetIds="", VpcSecurityGroupIds="")


def test_given_domain_subnets_when_described_then_the_count_rules_cannot_check_is_documented() -> None:
    # Rules have no Fn::Select or length function ("Rules syntax": Fn::And, Fn::Contains, Fn::EachMemberEquals,
    # Fn::EachMemberIn, Fn::Equals, Fn::Not, Fn::Or, Fn::RefAll, Fn::ValueOf, Fn::ValueOfAll), so fewer
    # subnets than zones cannot be refused up front: the parameter says so, and so does the guide.
    description = transform()["Parameters"]["DomainSubnetIds"]["Description"]
    assert "at least that many" in description and "Fn::Select" in description
    assert "Fn::Select cannot select nonexistent value" in (ROOT / "docs" / "deploy.md").read_text()


@pytest.mark.parametrize(
    ("tag", "accepted"),
    [
        ("2.3.0-cpu-py311", True),
        ("2.3.0-cpu-py311-ubuntu20.04-sagemaker", True),
        ("2.5.1-cpu-py311-ubuntu22.04-sagemaker", True),
        ("2.4.0-cpu-py310", False),
        ("2.6.0-cpu-py312", False),
        ("2.6.0-cpu-py312-ubuntu22.04-sagemaker", False),
        ("latest", False),
    ],
)
def test_given_inference_image_when_its_python_differs_from_the_vendored_wheels_then_refused(
    tag: str, accepted: bool
) -> None:
    # The model archive's code/lib holds wheels built for packaging.WHEEL_PYTHON (regex is compiled for it).
    from clipsearch.sagemaker import packaging

    parameter = transform()["Parameters"]["InferenceImageUri"]
    uri = f"763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-inference:{tag}"
    # CloudFormation matches AllowedPattern against the whole value ("Parameters", AllowedPattern).
    assert (re.fullmatch(parameter["AllowedPattern"], uri) is not None) is accepted
    python_tag = "py" + packaging.WHEEL_PYTHON.replace(".", "")
    assert python_tag in parameter["AllowedPattern"] and python_tag in parameter["ConstraintDescription"]
    assert python_tag in parameter["Description"]

"""The job file: good files load and resolve; bad ones are refused with a precise message."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from cloudtrain.errors import ExitCode, SpecError
from cloudtrain.spec import KERAS3_MULTIWORKER_BUG, JobSpec, json_schema, load_job

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name: digits-mlp
backend: tensorflow
setup: pip install -r requirements.txt
run: python train.py --epochs 20
outputs: [outputs/, logs/metrics.csv]
data:
  - {src: ./data, dst: data}
  - {src: s3://my-bucket/set/, dst: data/set}
env: {BATCH: 64, MODE: fast, DEBUG: true}
seed: 42
resources:
  gpu: t4
  spot: true
  max_price: 0.40
  region: us-east-1
  zones: [us-east-1a]
  disk_gb: 100
  image: ami-0123456789abcdef0
budget: {max_hours: 4, max_cost_usd: 5.0}
secrets: [WANDB_API_KEY]
"""


def write_job(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    (tmp_path / "data").mkdir(exist_ok=True)
    return path


def refused(tmp_path: Path, text: str) -> str:
    path = write_job(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_job(path)
    assert info.value.exit_code == ExitCode.INVALID_INPUT
    return info.value.message


def test_full_example_loads_and_resolves(tmp_path: Path) -> None:
    spec = load_job(write_job(tmp_path, GOOD))
    assert spec.name == "digits-mlp"
    assert spec.workdir == str(tmp_path.resolve())
    assert spec.data[0].src == str((tmp_path / "data").resolve())
    assert spec.data[1].src == "s3://my-bucket/set/" and spec.data[1].is_s3
    assert spec.env == {"BATCH": "64", "MODE": "fast", "DEBUG": "true"}
    assert spec.resources.gpu == "T4"  # canonical spelling
    assert spec.resources.gpu_model == "T4" and spec.resources.gpu_count == 1
    assert spec.budget.max_hours == 4
    assert spec.secrets == ["WANDB_API_KEY"]


def test_minimal_job_gets_defaults(tmp_path: Path) -> None:
    spec = load_job(write_job(tmp_path, "name: x\nrun: python train.py\n"))
    assert spec.backend == "tensorflow"
    assert spec.resources.spot is True
    assert spec.resources.gpu is None and spec.resources.instance_type is None
    assert spec.resources.disk_gb == 100
    assert spec.outputs == [] and spec.data == [] and spec.secrets == []


@pytest.mark.parametrize(
    ("lines", "keras"),
    [("", 3), ("backend: theano\n", 2), ("keras: 2\n", 2), ("backend: theano\nkeras: 2\n", 2)],
)
def test_the_keras_api_is_settled_when_loaded(tmp_path: Path, lines: str, keras: int) -> None:
    assert load_job(write_job(tmp_path, f"name: x\nrun: r\n{lines}")).keras == keras


def test_nodes_default_to_one_and_several_train_on_tf_keras(tmp_path: Path) -> None:
    assert load_job(write_job(tmp_path, "name: x\nrun: r\n")).resources.nodes == 1
    spec = load_job(write_job(tmp_path, "name: x\nrun: r\nkeras: 2\nresources: {nodes: 16, gpu: 'T4:4'}\n"))
    assert (spec.resources.nodes, spec.keras, spec.backend) == (16, 2, "tensorflow")


def test_several_nodes_on_keras_3_name_the_upstream_bug_and_exit_2(tmp_path: Path) -> None:
    """One constant names the bug, so the refusal can be lifted where it is written."""
    message = refused(tmp_path, "name: x\nrun: r\nresources: {nodes: 2}\n")
    assert KERAS3_MULTIWORKER_BUG in message and "keras: 2" in message


def test_gpu_with_count(tmp_path: Path) -> None:
    spec = load_job(write_job(tmp_path, "name: x\nrun: r\nresources: {gpu: 'v100:4'}\n"))
    assert spec.resources.gpu == "V100:4"
    assert spec.resources.gpu_count == 4


def test_example_jobs_are_valid() -> None:
    jobs = sorted((REPO / "jobs").glob("*/job.yaml"))
    assert jobs, "jobs/ has no example"
    for job in jobs:
        assert isinstance(load_job(job), JobSpec)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "name: x\nrun: r\nresoures: {gpu: T4}\n",
            "job.yaml:3: resoures: unknown key 'resoures' (did you mean 'resources'?)",
        ),
        (
            "name: x\nrun: r\nresources:\n  gpus: T4\n",
            "job.yaml:4: resources.gpus: unknown key 'gpus' (did you mean 'gpu'?)",
        ),
        (
            "name: x\nrun: r\nresources: {max_price: -1}\n",
            "job.yaml:3: resources.max_price: Input should be greater than 0",
        ),
        (
            "name: x\nrun: r\nresources:\n  disk_gb: 0\n",
            "job.yaml:4: resources.disk_gb: Input should be greater than 0",
        ),
        (
            "name: x\nrun: r\nbudget:\n  max_hours: 0\n",
            "job.yaml:4: budget.max_hours: Input should be greater than 0",
        ),
        (
            "name: x\nrun: r\nresources:\n  disk_gb: lots\n",
            "job.yaml:4: resources.disk_gb: Input should be a valid integer",
        ),
        ("name: x\n", "job.yaml:1: run: is required"),
        (
            "name: Big_Name\nrun: r\n",
            "job.yaml:1: name: 'Big_Name' must be 1-40 lower-case letters",
        ),
        (
            "name: x\nrun: r\nbackend: pytorch\n",
            "job.yaml:3: backend: Input should be 'tensorflow' or 'theano'",
        ),
        (
            "name: x\nrun: r\noutputs: [../secret]\n",
            "job.yaml:3: outputs[0]: '../secret' escapes the workdir with '..'",
        ),
        (
            "name: x\nrun: r\noutputs:\n  - /etc/passwd\n",
            "job.yaml:4: outputs[0]: '/etc/passwd' is absolute",
        ),
        (
            "name: x\nrun: r\ndata:\n  - {src: s3://b/k, dst: ../../x}\n",
            "job.yaml:4: data[0].dst: '../../x' escapes the workdir",
        ),
        (
            "name: x\nrun: r\nresources: {gpu: T5}\n",
            "job.yaml:3: resources.gpu: unknown GPU 'T5' (did you mean 'T4'?)",
        ),
        (
            "name: x\nrun: r\nresources: {instance_type: g4dn.xlarg}\n",
            "resources.instance_type: 'g4dn.xlarg' is not a GPU instance type cloudtrain knows (did you mean 'g4dn.xlarge'?)",
        ),
        (
            "name: x\nrun: r\nresources: {gpu: T4, instance_type: g4dn.xlarge}\n",
            "job.yaml:3: resources: give either gpu or instance_type, not both",
        ),
        (
            "name: x\nrun: r\nresources: {region: us-east-1, zones: [eu-west-1a]}\n",
            "zone 'eu-west-1a' is not in region us-east-1",
        ),
        (
            "name: x\nrun: r\nresources: {region: mars-1}\n",
            "resources.region: 'mars-1' is not an AWS region name",
        ),
        ("name: x\nrun: r\nworkdir: nowhere\n", "job.yaml:3: workdir: folder"),
        ("name: x\nrun: r\ndata:\n  - {src: ./missing, dst: d}\n", "job.yaml:4: data[0].src:"),
        (
            "name: x\nrun: r\nsecrets: [NOT-A-NAME]\n",
            "'NOT-A-NAME' is not a valid environment variable name",
        ),
        (
            "name: x\nrun: r\nresources: {gpu: 'T4:0'}\n",
            "the count after ':' must be a positive whole number",
        ),
        ("name: x\nrun: r\nresources: {image: ami-xyz}\n", "'ami-xyz' is not an AMI id"),
        (
            "name: x\nrun: r\nbackend: theano\nkeras: 3\n",
            "job.yaml:4: keras: Keras 3 has no Theano backend: use keras: 2",
        ),
        ("name: x\nrun: r\nkeras: 1\n", "job.yaml:3: keras: Input should be 2 or 3"),
        (
            "name: x\nrun: r\nkeras: 2\nresources:\n  nodes: 0\n",
            "job.yaml:5: resources.nodes: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            "name: x\nrun: r\nkeras: 2\nresources:\n  nodes: 17\n",
            "job.yaml:5: resources.nodes: Input should be less than or equal to 16 (got 17)",
        ),
        (
            "name: x\nrun: r\nkeras: 2\nresources: {nodes: true}\n",
            "job.yaml:4: resources.nodes: Input should be a valid integer (got True)",
        ),
        (
            "name: x\nrun: r\nbackend: theano\nresources:\n  nodes: 2\n",
            "job.yaml:5: resources.nodes: 2 nodes need tf.distribute, which backend: theano does not have: "
            "use backend: tensorflow with keras: 2, or nodes: 1",
        ),
        (
            "name: x\nrun: r\nresources:\n  nodes: 2\n",
            "job.yaml:4: resources.nodes: 2 nodes need keras: 2 (tf-keras): under keras: 3 (the default on "
            "tensorflow), fit fails with MultiWorkerMirroredStrategy (keras-team/keras#20585); set keras: 2",
        ),
        (
            "name: x\nrun: r\nkeras: 3\nresources:\n  nodes: 4\n",
            "job.yaml:5: resources.nodes: 4 nodes need keras: 2 (tf-keras): under keras: 3, fit fails",
        ),
        # wrong types are refused, not coerced
        (
            "name: x\nrun: r\nresources: {disk_gb: true}\n",
            "job.yaml:3: resources.disk_gb: Input should be a valid integer (got True)",
        ),
        (
            "name: x\nrun: r\nresources: {spot: 'yes'}\n",
            "job.yaml:3: resources.spot: Input should be a valid boolean (got 'yes')",
        ),
        (
            "name: x\nrun: r\nresources: {max_price: '0.3'}\n",
            "job.yaml:3: resources.max_price: Input should be a valid number (got '0.3')",
        ),
        ("name: x\nrun: r\nseed: '42'\n", "job.yaml:3: seed: Input should be a valid integer (got '42')"),
        ("name: x\nrun: 42\n", "job.yaml:2: run: Input should be a valid string (got 42)"),
        (
            "name: x\nrun: r\nbudget: {max_hours: .inf}\n",
            "job.yaml:3: budget.max_hours: Input should be a finite number",
        ),
        (
            "name: x\nrun: r\nbudget: {max_cost_usd: .nan}\n",
            "job.yaml:3: budget.max_cost_usd: Input should be a finite number",
        ),
        (
            "name: x\nrun: r\nbudget: {max_hours: 1:30}\n",
            "job.yaml:3: budget.max_hours: YAML reads 1:30 as base 60, 90; write the number you mean",
        ),
        (
            "name: x\nrun: r\nseed: 1\nseed: 2\n",
            "job.yaml:4: seed: appears twice (first on line 3); the later one would silently win",
        ),
        (
            "name: x\nrun: r\nresources:\n  gpu: T4\n  gpu: A10G\n",
            "job.yaml:5: resources.gpu: appears twice (first on line 4)",
        ),
    ],
)
def test_bad_files_refused_with_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    message = refused(tmp_path, text)
    assert expected in message


def test_whole_numbers_and_yaml_booleans_still_fit_their_keys(tmp_path: Path) -> None:
    spec = load_job(
        write_job(
            tmp_path,
            "name: x\nrun: r\nenv: {EPOCHS: 5, FAST: true, PY: 3.10, MODE: 010, AT: 1:30, LR: 1e-3}\n"
            "resources: {max_price: 1e-1, spot: no}\nbudget: {max_hours: 2, max_cost_usd: 3}\n",
        )
    )
    assert spec.resources.max_price == 0.1 and spec.resources.spot is False  # YAML 1.2's 1e-1 too
    assert spec.budget.max_hours == 2.0
    # env: the text as typed, not what YAML 1.1 makes of it (3.1, 8, 90, 0.001)
    assert spec.env == {
        "EPOCHS": "5",
        "FAST": "true",
        "PY": "3.10",
        "MODE": "010",
        "AT": "1:30",
        "LR": "1e-3",
    }


def test_merge_keys_are_no_duplicates(tmp_path: Path) -> None:
    spec = load_job(
        write_job(
            tmp_path,
            "name: x\nrun: r\nenv:\n  <<: {A: a}\n  <<: {B: b}\n  C: c\n"
            "data:\n  - &one {src: s3://bucket-one/x/, dst: one}\n  - {<<: *one, dst: two}\n",
        )
    )
    assert spec.env == {"A": "a", "B": "b", "C": "c"}
    assert [d.dst for d in spec.data] == ["one", "two"]


def test_empty_file(tmp_path: Path) -> None:
    assert "the job file is empty" in refused(tmp_path, "")


def test_non_mapping_document(tmp_path: Path) -> None:
    assert "must be a mapping of keys" in refused(tmp_path, "- name: x\n- run: r\n")


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    message = refused(tmp_path, "name: x\nrun: [unclosed\nseed: 1\n")
    assert "not valid YAML" in message and "job.yaml:" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such job file"):
        load_job(tmp_path / "nope.yaml")


def test_several_problems_listed_together(tmp_path: Path) -> None:
    message = refused(tmp_path, "name: x\nrun: r\nseed: -1\nresources: {disk_gb: 0}\n")
    assert "2 problems" in message
    assert "job.yaml:3: seed:" in message and "job.yaml:4: resources.disk_gb:" in message


def test_unknown_key_without_close_match_lists_choices(tmp_path: Path) -> None:
    message = refused(tmp_path, "name: x\nrun: r\nbudget: {zzz: 1}\n")
    assert "unknown key 'zzz'; expected one of: max_cost_usd, max_hours" in message


def test_schema_describes_every_top_level_key() -> None:
    schema = json_schema()
    assert set(schema["properties"]) == set(JobSpec.model_fields)
    assert schema["required"] == ["name", "run"]
    json.dumps(schema)  # serialisable


@pytest.mark.parametrize(
    "extra", ["secrets: [AWS_SECRET_ACCESS_KEY]\n", "env: {AWS_ACCESS_KEY_ID: AKIAEXAMPLE}\n"]
)
def test_aws_credentials_never_go_to_the_instance(tmp_path: Path, extra: str) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: creds\nrun: python train.py\n" + extra)
    with pytest.raises(SpecError, match="AWS credentials never go to the instance"):
        load_job(job)


@pytest.mark.parametrize("extra", ["secrets: [CLOUDTRAIN_TOKEN]\n", "env: {CLOUDTRAIN_GPUS_PER_NODE: 8}\n"])
def test_cloudtrains_own_variables_are_not_the_jobs(tmp_path: Path, extra: str) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: mine\nrun: python train.py\n" + extra)
    with pytest.raises(SpecError, match="CLOUDTRAIN_\\* variables are cloudtrain's own"):
        load_job(job)

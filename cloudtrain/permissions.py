"""Every AWS operation the controller performs, with the IAM actions and resources each
needs: the one list ``cloudtrain iam-policy`` turns into the policy a user attaches, and
that the test suite holds every AWS call of every ``cloudtrain`` process to
(``CLOUDTRAIN_RECORD_AWS_OPERATIONS``, tests/test_permissions.py).

A leaf (stdlib only). The policy grants EC2 what a run, ``gc``, ``image`` and ``doctor``
use, on any resource (EC2's tag conditions were not tried against AWS from here), and
scopes IAM to the roles and instance profiles cloudtrain creates (``cloudtrain-*``):
``iam:PassRole`` only to EC2, and a role only with the permissions boundary
``cloudtrain-instance-boundary`` (a policy the user creates once from
``iam-policy --boundary``), so that create-role + put-role-policy + pass-role cannot make
a role stronger than reading and writing S3 objects.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

RECORD_ENV = "CLOUDTRAIN_RECORD_AWS_OPERATIONS"  # a file each process appends "service:Operation" lines to
# Modules that only pass a call on to AWS: the caller recorded is the first frame outside them
# (a test's checking wrapper adds its own).
PASS_THROUGH = {"botocore", "boto3"}
BOUNDARY_POLICY_NAME = "cloudtrain-instance-boundary"
ROLE_PREFIX = "cloudtrain-"  # the runs' roles and instance profiles (aws.AwsCloud.instance_profile_name)
SPOT_SERVICE_LINKED_ROLE = "arn:aws:iam::*:role/aws-service-role/spot.amazonaws.com/AWSServiceRoleForEC2Spot"

# What a statement's resources are, by scope.
ANY = "any"
ROLES = "roles"  # cloudtrain-* roles
PROFILES = "profiles"  # cloudtrain-* instance profiles
BUCKET = "bucket"  # the bucket of --with-s3


@dataclass(frozen=True)
class Operation:
    """One AWS API operation the controller calls (``service`` is botocore's endpoint
    prefix: ``ec2``, ``iam``), the IAM actions it needs, on what, and who calls it."""

    service: str
    name: str
    why: str
    scope: str = ANY
    actions: tuple[str, ...] = ()  # default: service:name

    @property
    def key(self) -> str:
        return f"{self.service}:{self.name}"

    @property
    def needs(self) -> tuple[str, ...]:
        return self.actions or (self.key,)


def _ops(service: str, scope: str, why: str, *names: str) -> tuple[Operation, ...]:
    return tuple(Operation(service, name, why, scope) for name in names)


OPERATIONS: tuple[Operation, ...] = (
    *_ops("ec2", ANY, "plan: spot prices", "DescribeSpotPriceHistory"),
    *_ops(
        "ec2",
        ANY,
        "run: launch, watch and end an instance (image build: the builder; doctor --launch)",
        "DescribeImages",
        "DescribeVpcs",
        "CreateKeyPair",
        "DescribeKeyPairs",
        "DeleteKeyPair",
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
        "DescribeSecurityGroups",
        "DeleteSecurityGroup",
        "RunInstances",
        "CreateTags",
        "DescribeInstances",
        "GetConsoleOutput",
        "TerminateInstances",
        "DescribeSpotInstanceRequests",
        "CancelSpotInstanceRequests",
        "DescribeVolumes",
        "DeleteVolume",
    ),
    *_ops(
        "ec2",
        ANY,
        "run: a cluster's placement group (gc: its tags)",
        "CreatePlacementGroup",
        "DescribePlacementGroups",
        "DeletePlacementGroup",
    ),
    *_ops(
        "ec2",
        ANY,
        "image build, copy and rm",
        "CreateImage",
        "CopyImage",
        "DeregisterImage",
        "DeleteSnapshot",
    ),
    Operation(
        "ec2",
        "RunInstances:spot",
        "an account's first spot launch makes the spot service-linked role",
        actions=("iam:CreateServiceLinkedRole",),
    ),
    *_ops(
        "servicequotas",
        ANY,
        "plan and doctor: the spot vCPU quota",
        "GetServiceQuota",
        "GetAWSDefaultServiceQuota",
    ),
    Operation("sts", "GetCallerIdentity", "doctor: who the credentials are; the boundary's account"),
    *_ops(
        "iam",
        ROLES,
        "a run reading S3: its role (gc: its tags)",
        "CreateRole",
        "PutRolePolicy",
        "DeleteRolePolicy",
        "DeleteRole",
        "ListRoleTags",
        "TagRole",
    ),
    Operation(
        "iam",
        "RunInstances:profile",
        "a run reading S3: the instance gets its role",
        ROLES,
        ("iam:PassRole",),
    ),
    *_ops(
        "iam",
        PROFILES,
        "a run reading S3: its instance profile",
        "CreateInstanceProfile",
        "GetInstanceProfile",
        "AddRoleToInstanceProfile",
        "RemoveRoleFromInstanceProfile",
        "DeleteInstanceProfile",
        "TagInstanceProfile",
    ),
    *_ops("iam", ANY, "gc: the runs' roles and instance profiles", "ListRoles", "ListInstanceProfiles"),
    Operation(
        "s3", "HeadBucket", "a run: its data's and checkpoint's buckets exist", BUCKET, ("s3:ListBucket",)
    ),
)

# Operations that are not calls of their own but conditions of one (RunInstances).
IMPLIED = frozenset({"ec2:RunInstances:spot", "iam:RunInstances:profile"})


def operation_keys() -> frozenset[str]:
    """``service:Operation`` of every listed call, as the recording writes them."""
    return frozenset(op.key for op in OPERATIONS if op.key not in IMPLIED)


def actions_for(operation: str) -> tuple[str, ...]:
    """The IAM actions an operation needs (``iam:CreateRole``), for an access-denied message."""
    for op in OPERATIONS:
        if op.name == operation:
            return op.needs
    return (f"the permission for {operation}",)


def _statement(
    sid: str, actions: Iterable[str], resources: list[str], condition: Any = None
) -> dict[str, Any]:
    statement: dict[str, Any] = {
        "Sid": sid,
        "Effect": "Allow",
        "Action": sorted(set(actions)),
        "Resource": resources if len(resources) > 1 else resources[0],
    }
    if condition:
        statement["Condition"] = condition
    return statement


def boundary_arn(account: str = "${aws:PrincipalAccount}") -> str:
    return f"arn:aws:iam::{account}:policy/{BOUNDARY_POLICY_NAME}"


def user_policy(buckets: Iterable[str] = ()) -> dict[str, Any]:
    """The policy a cloudtrain user (or role) needs: every operation of OPERATIONS, and
    ``buckets``' checks."""
    by_scope: dict[str, list[str]] = {}
    for op in OPERATIONS:
        if op.key in IMPLIED:
            continue
        by_scope.setdefault(op.scope, []).extend(op.needs)
    roles = [f"arn:aws:iam::*:role/{ROLE_PREFIX}*"]
    bounded = {"StringEquals": {"iam:PermissionsBoundary": boundary_arn()}}
    # only what could make a role stronger needs the boundary; deleting a policy cannot (and
    # a role made before the boundary existed must still be removable)
    role_writes = {"iam:CreateRole", "iam:PutRolePolicy"}
    statements = [
        _statement("Ec2AndLists", by_scope[ANY], ["*"]),
        _statement("RunRolesOnlyWithTheBoundary", role_writes, roles, bounded),
        _statement("RunRoles", set(by_scope[ROLES]) - role_writes, roles),
        _statement(
            "PassRunRolesToEc2Only",
            ["iam:PassRole"],
            roles,
            {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
        ),
        _statement(
            "RunInstanceProfiles", by_scope[PROFILES], [f"arn:aws:iam::*:instance-profile/{ROLE_PREFIX}*"]
        ),
        _statement(
            "SpotServiceLinkedRole",
            ["iam:CreateServiceLinkedRole"],
            [SPOT_SERVICE_LINKED_ROLE],
            {"StringLike": {"iam:AWSServiceName": "spot.amazonaws.com"}},
        ),
    ]
    if buckets:
        arns = [f"arn:aws:s3:::{b}" for b in sorted(set(buckets))]
        statements.append(_statement("JobBuckets", by_scope[BUCKET], arns))
    return {"Version": "2012-10-17", "Statement": statements}


def boundary_policy() -> dict[str, Any]:
    """The most any run's role may do, whatever its own policy says: S3 objects only."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            _statement(
                "RunRolesReadAndWriteS3Only",
                ["s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                ["*"],
            )
        ],
    }


def instance_policy_example() -> dict[str, Any]:
    """A run's own role policy, for a job reading s3://DATA-BUCKET and checkpointing under
    s3://CKPT-BUCKET/runs/RUN/ (aws.s3_read_policy writes the real one per run)."""
    from cloudtrain.cloud.aws import s3_read_policy  # the one definition, imported only here

    return s3_read_policy(["DATA-BUCKET"], ["s3://CKPT-BUCKET/runs/RUN/"])


def record(service: str, operation: str, environ: Mapping[str, str] = os.environ) -> None:
    """Append ``service:Operation`` to the file RECORD_ENV names, if it names one."""
    path = environ.get(RECORD_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(f"{service}:{operation}\n")


def dumps(policy: Mapping[str, Any]) -> str:
    return json.dumps(policy, indent=2)

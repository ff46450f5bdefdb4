"""``cloudtrain image build``: bake the job environments into an image, once per region.

A builder instance (on-demand, tagged like a run) boots from a base image; the ``ami/``
recipe (provision.sh) runs on it over the same pinned SSH session as a run, its output
streamed; each job environment is configured and verified with the run's own backend
verification (``bringup.verify_backend``: on a GPU builder each backend must see
the GPU); then create_image, wait until it is available, tag it with the recipe's
version, and terminate the builder, whatever happened (a failure, Ctrl-C, SIGTERM).
The build is a run named ``image-build`` in the ledger, with its instance, so
``cost-report`` shows what it cost on a line of its own.

The same code runs for ``--dry-run``: the builder is a simulated host whose
``CLOUDTRAIN_IMAGE_PREFIX`` is the simulated image, which the recipe then builds or reuses.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cloudtrain.bringup import (
    describe_backend,
    run_recipe,
    ssh_endpoint,
    verify_backend,
)
from cloudtrain.catalog import load_catalog
from cloudtrain.cloud.aws import (
    IMAGE_NAME_PREFIX,
    TAG_FRAMEWORKS,
    TAG_IMAGE_VERSION,
    TAG_OWNER,
    TAG_RUN_ID,
    AwsCloud,
    LaunchRequest,
    caller_cidr,
    run_tags,
)
from cloudtrain.cloud.simimage import ENVS, recipe_version
from cloudtrain.errors import CloudError, CloudtrainError, ExitCode, InputError
from cloudtrain.ledger import InstanceRow, Ledger, RunRow
from cloudtrain.progress import Reporter
from cloudtrain.records import Lifecycle, RunHandle, RunState, iso, new_run_id, utcnow
from cloudtrain.remote.agent import RemoteAgent
from cloudtrain.remote.session import Session
from cloudtrain.settings import Settings
from cloudtrain.teardown import shielded_from_signals, teardown

BUILD_NAME = "image-build"  # the build's run name: its own line in cost-report
DEFAULT_BUILDER_TYPE = "g4dn.xlarge"  # the cheapest GPU type: the build checks the GPU is seen
BUILDER_DISK_GB = 100  # the image's root volume: a run's disk_gb (default 100) is at least this
BUILD_HOURS = 3.0  # the builder's expiry tag (for `gc`): a build takes well under this
REMOTE_BUILD_DIR = ".cloudtrain/build"  # one run folder per verified backend


@dataclass(frozen=True)
class BuildResult:
    run_id: str
    region: str
    image_id: str
    name: str
    version: str
    builder: str  # the builder instance's id (terminated)
    base_image: str  # the AMI id it was built on
    backends: dict[str, Any]  # backend -> the agent's verification report
    simulated: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "run_id": self.run_id,
            "region": self.region,
            "image": self.image_id,
            "name": self.name,
            "version": self.version,
            "builder": self.builder,
            "base_image": self.base_image,
            "backends": self.backends,
            "simulated": self.simulated,
        }


def frameworks_tag(reports: dict[str, Any]) -> str:
    """``tensorflow: Keras 3.12.4, tensorflow 2.21.0; theano: Keras 2.3.1, theano 1.0.5``, from
    each environment's verification, within a tag value's 256 characters."""
    parts = [
        f"{env}: Keras {r.get('keras_version')}, {r.get('framework')} {r.get('framework_version')}"
        for env, r in sorted(reports.items())
    ]
    return "; ".join(parts)[:256]


def builder_price(instance_type: str, region: str) -> float:
    """The builder's on-demand USD/h from the catalog; an InputError for a type it lacks there."""
    itype = load_catalog().get(instance_type)
    price = itype.on_demand_price(region) if itype else None
    if price is None:
        raise InputError(
            f"no on-demand price for {instance_type} in {region} in the catalog",
            hint="Pass --instance-type with a GPU type the catalog lists for this region.",
        )
    return price


def build(
    settings: Settings,
    ledger: Ledger,
    *,
    region: str,
    base: str | None = None,
    instance_type: str = DEFAULT_BUILDER_TYPE,
    envs: Sequence[str] = ENVS,
    reporter: Reporter | None = None,
) -> BuildResult:
    """Build the cloudtrain image in ``region``; the builder is terminated whatever happens."""
    reporter = reporter or Reporter()
    price = builder_price(instance_type, region)
    catalog = load_catalog()
    version = recipe_version()
    now = utcnow()
    run_id = new_run_id(BUILD_NAME, now)
    ledger.create_run(
        RunRow(
            id=run_id,
            name=BUILD_NAME,
            state=RunState.PLANNED,
            created_at=now,
            backend=",".join(envs),
            simulated=settings.simulated,
            region=region,
            handle=RunHandle(image_version=version, instance_type=instance_type),
        )
    )
    cloud = AwsCloud(settings, region)
    acquired: dict[str, Any] = {}
    outcome, exit_code = RunState.FAILED, None

    def state(new: RunState, message: str, **changes: Any) -> None:
        ledger.update_run(run_id, state=new, **changes)
        ledger.add_event(run_id, new.value, message)
        reporter.stage(new, message)

    try:
        tags = run_tags(run_id, settings.owner, now + timedelta(hours=BUILD_HOURS))
        state(
            RunState.LAUNCHING,
            f"launching the builder {instance_type} (on-demand, ${price:.4f}/h) in {region}",
        )
        base_image = cloud.base_image(base)
        reporter.info(f"base image {base_image.name} ({base_image.id})")
        key = cloud.ensure_key_pair(run_id, tags)
        acquired["key_name"] = key.name
        acquired["security_group_id"] = cloud.create_security_group(run_id, caller_cidr(settings), tags)
        ledger.update_run(run_id, handle={**acquired, "key_path": str(key.path), "base_image": base_image.id})
        instance_id = cloud.launch(
            LaunchRequest(
                run_id=run_id,
                instance_type=instance_type,
                zone=None,
                spot=False,
                max_price=None,
                disk_gb=BUILDER_DISK_GB,
                image=base_image,
                key=key,
                security_group_id=acquired["security_group_id"],
                client_token=f"{run_id}-1",
                tags=tags,
            )
        )
        acquired["instance_id"] = instance_id
        ledger.record_instance(
            InstanceRow(
                id=instance_id,
                run_id=run_id,
                instance_type=instance_type,
                zone=None,
                lifecycle=Lifecycle.ON_DEMAND,
                price_per_hour=price,
                on_demand_per_hour=price,
                launched_at=utcnow(),
                disk_gb=BUILDER_DISK_GB,
                ebs_per_gb_month=catalog.ebs_price(region),
            )
        )
        ledger.update_run(run_id, handle={"instance_id": instance_id})
        launched = cloud.wait_running(instance_id)
        ledger.instance_running(instance_id, utcnow())
        ledger.update_run(run_id, started_at=utcnow())
        reporter.info(f"builder {instance_id} is running in {launched.zone}")

        state(RunState.PROVISIONING, f"running the image recipe ({', '.join(envs)}) on {instance_id}")
        _, endpoint = ssh_endpoint(cloud, instance_id, key.path, loopback_only=settings.loopback_hosts)
        with Session(endpoint).connect() as session:
            RemoteAgent(session, envs[0]).install()
            gpu = settings.instance_gpus
            run_recipe(session, envs, reporter, instance_id, gpu=gpu)
            reports: dict[str, Any] = {}
            for env in envs:
                agent = RemoteAgent(session, env, f"{REMOTE_BUILD_DIR}/{env}")
                reports[env] = verify_backend(agent, gpu=gpu)
                reporter.info(f"{env}: {describe_backend(reports[env])}")
            ledger.update_run(run_id, handle={"backend_reports": reports})
            # what the build left in the login user's home stays off the image: the agent, the
            # recipe, the verification's keras.json, and the build key pair's authorized key
            session.run(
                "rm -rf .cloudtrain .keras .theanorc && "
                "{ [ ! -f .ssh/authorized_keys ] || : > .ssh/authorized_keys; }"
            )

        name = f"{IMAGE_NAME_PREFIX}{version}-{utcnow().strftime('%Y%m%d-%H%M%S')}"
        image_tags = {
            TAG_OWNER: settings.owner,
            TAG_RUN_ID: run_id,
            TAG_IMAGE_VERSION: version,
            TAG_FRAMEWORKS: frameworks_tag(reports),
            "Name": name,
        }
        reporter.info(f"creating the image {name} from {instance_id}")
        image_id = cloud.create_image(
            instance_id, name, f"cloudtrain image, recipe version {version} ({', '.join(envs)})", image_tags
        )
        acquired["image_id"] = image_id
        ledger.update_run(run_id, handle={"image_id": image_id, "image_name": name})
        reporter.steps("creating the image", 0, None)  # minutes on AWS: a bar with the time it takes
        cloud.wait_image_available(image_id)
        reporter.steps("creating the image", 1, 1)
        acquired.pop("image_id")  # done: it stays
        ledger.add_event(run_id, "image-available", f"{image_id} ({name}) is available in {region}")
        reporter.info(f"image {image_id} is available")
        outcome, exit_code = RunState.SUCCEEDED, 0
        return BuildResult(
            run_id, region, image_id, name, version, instance_id, base_image.id, reports, settings.simulated
        )
    except (KeyboardInterrupt, SystemExit) as e:
        outcome = RunState.CANCELLED
        exit_code = int(ExitCode.SIGTERM) if isinstance(e, SystemExit) else int(ExitCode.SIGINT)
        reporter.warn("interrupted: terminating the builder")
        raise
    except CloudtrainError as e:
        ledger.add_event(run_id, "error", e.message)
        raise
    finally:
        _finish(cloud, ledger, run_id, acquired, outcome, exit_code, reporter)


def _finish(
    cloud: AwsCloud,
    ledger: Ledger,
    run_id: str,
    acquired: dict[str, Any],
    outcome: RunState,
    exit_code: int | None,
    reporter: Reporter,
) -> None:
    """Terminate the builder (confirmed), delete its group and key pair, and an image whose
    creation did not finish; record the outcome. Signals wait until this is done."""
    with shielded_from_signals():
        problems: list[str] = []
        if acquired.get("image_id"):
            try:
                cloud.delete_image(cloud.image_info(acquired["image_id"]))
                ledger.add_event(run_id, "image-deleted", f"{acquired['image_id']}: its build did not finish")
            except CloudtrainError as e:
                problems.append(f"image {acquired['image_id']}: {e.message}")
        held = RunHandle(
            instance_id=acquired.get("instance_id"),
            security_group_id=acquired.get("security_group_id"),
            key_name=acquired.get("key_name"),
        )
        problems += teardown(cloud, ledger, run_id, held)
        ledger.update_run(run_id, state=outcome, ended_at=utcnow(), exit_code=exit_code)
        ledger.add_event(run_id, outcome.value, f"image build {outcome.value} at {iso(utcnow())}")
        reporter.stage(outcome, f"image build {outcome.value}")
    if problems:
        error = CloudError(
            "teardown incomplete: " + "; ".join(problems),
            hint=f"Run `cloudtrain down {run_id}` to retry, or remove them in the EC2 console.",
        )
        if sys.exc_info()[1] is None:
            raise error
        reporter.warn(f"{error.message}. {error.hint}")

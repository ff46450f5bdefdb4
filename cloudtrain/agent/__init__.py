"""The on-instance agent of `cloudtrain run`.

The controller copies this folder to the instance as the package `cloudtrain_agent`
and runs `python3 -m cloudtrain_agent <command> ...` with the instance's own Python,
so everything here is standard library only, runs on Python 3.7, and imports its
siblings relatively (it works as `cloudtrain.agent` and as `cloudtrain_agent`).

Commands (see `cli.py`): backend, verify, start, status, tail, stop, poweroff.
Each prints one JSON object on stdout, except `tail`, which streams the raw log.
"""

AGENT_VERSION = "1"

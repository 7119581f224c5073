"""A shell's S3 session token (an AWS SSO login, a CI runner's cloud role) never goes with a stack's keys.

MLflow's S3 client reads the keys and the token from the environment together: the stack's keys (from ``.env``)
with another account's token were refused, ``InvalidAccessKeyId``. Each command here runs in its own process, with
the token in its environment as a shell or a runner leaves it, and the stack's keys in a ``.env`` written by hand
(the four variables, no token line: as a user copies them from the docs or another machine).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from plantml.training import synth

pytestmark = pytest.mark.local_session

OTHER_TOKEN = "IQoJb3JpZ2luX2VjEOr//////////wEaCWV1LXdlc3QtMyJGMEQCIFAKE"
BASE = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def test_a_shells_token_of_other_keys_is_not_sent_with_the_stacks_keys_from_dot_env(mlflow_stack, tmp_path):
    """``verify`` logs an artifact through MLflow's S3 client; ``data push`` uploads through plantml's own. Both
    token variables are set: boto3 reads the legacy AWS_SECURITY_TOKEN first, then AWS_SESSION_TOKEN, so one left
    to it fails the run."""
    stack_env = mlflow_stack.client_env()
    (tmp_path / ".env").write_text("".join(f"{key}={stack_env[key]}\n" for key in BASE))
    env = {**{k: v for k, v in os.environ.items() if k not in BASE},
           "AWS_SESSION_TOKEN": OTHER_TOKEN, "AWS_SECURITY_TOKEN": OTHER_TOKEN, "PLANTML_VERIFY_EXPERIMENT": "tokens"}
    verify = subprocess.run([sys.executable, "-m", "plantml", "verify"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.splitlines()[-1] == "✓ ALL MLFLOW TESTS PASSED"
    images = synth.generate(tmp_path / "leaves", synth.SynthSpec(per_class=3, size=16, seed=3))
    push = subprocess.run([sys.executable, "-m", "plantml", "data", "push", str(images),
                           "s3://plants-images/tokens"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert push.returncode == 0, push.stdout + push.stderr

"""``plantml verify``'s library: the eight checks of a tracking installation.

>>> from plantml.settings import resolve_tracking_settings
>>> from plantml.verification import run_checks
>>> for result in run_checks(resolve_tracking_settings()):
...     print(result.line)
"""

from plantml.verification.checks import ALL_PASSED, CHECKS, VERIFICATION_TAG, Check, CheckResult
from plantml.verification.runner import Verification, run_checks

__all__ = ["ALL_PASSED", "CHECKS", "VERIFICATION_TAG", "Check", "CheckResult", "Verification", "run_checks"]

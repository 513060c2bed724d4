"""The cirron-sdk 0.3.0 exception hierarchy, under the same names, plus `CirronNotProvided`.

Programs written for the SDK catch these by name (`except ci.CirronError`); the classes and
their bases are the SDK's (`CirronYamlError` derives from `Exception`, not `CirronError`,
as in the SDK). Caller bugs stay plain `ValueError` / `TypeError`, as there.
"""

from __future__ import annotations


class CirronError(Exception):
    """Base class of the errors cirron_otel raises (as cirron-sdk's)."""


class CirronSecretNotFound(CirronError):
    """cirron-sdk's `ci.secret` error; never raised here (secrets are not part of this package)."""


class CirronDependencyError(CirronError):
    """An optional dependency a call needs is not installed (e.g. pandas for trace(format='df'))."""


class CirronDatasetNotFound(CirronError):
    """cirron-sdk's platform `ci.load()` error; never raised here."""


class CirronPlatformRequired(CirronError):
    """cirron-sdk's platform-only-operation error; never raised here."""


class CirronDataSizeError(CirronError):
    """cirron-sdk's `ci.load()` size guard; never raised here."""


class CirronYamlError(Exception):
    """cirron.yaml cannot be read, parsed or validated (an `Exception`, as in cirron-sdk)."""


class CirronNotProvided(CirronError, NotImplementedError):
    """A cirron-sdk name that is not instrumentation (data loading, secrets, .env, dependency
    checks, the Cirron platform): kept under its name so a program fails at the call with this
    reason instead of an AttributeError at import. Also a NotImplementedError, so code that
    feature-tests with `except NotImplementedError` keeps working."""


__all__ = [
    "CirronDataSizeError",
    "CirronDatasetNotFound",
    "CirronDependencyError",
    "CirronError",
    "CirronNotProvided",
    "CirronPlatformRequired",
    "CirronSecretNotFound",
    "CirronYamlError",
]

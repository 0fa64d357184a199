"""The public surface: every name API.md lists is exported, importable and documented."""

from __future__ import annotations

import inspect

import pytest

import aiotasks

# The import block of API.md ("Everything importable from `aiotasks`"), verbatim.
API_NAMES = [
    "App",
    "Task",
    "Signature",
    "TaskHandle",
    "GroupHandle",
    "TaskInfo",
    "TaskState",
    "chord",
    "group",
    "chain",
    "current_task",
    "TaskContext",
    "Retry",
    "AiotasksError",
    "TaskFailed",
    "ChordError",
    "TaskRevoked",
    "ResultTimeout",
    "SoftTimeLimitExceeded",
    "TimeLimitExceeded",
    "BrokerConnectionError",
    "SerializationError",
    "UnknownTask",
]

ERRORS = [
    "AiotasksError",
    "TaskFailed",
    "ChordError",
    "TaskRevoked",
    "ResultTimeout",
    "SoftTimeLimitExceeded",
    "TimeLimitExceeded",
    "BrokerConnectionError",
    "SerializationError",
    "UnknownTask",
]


def test_all_lists_every_api_name() -> None:
    missing = sorted(set(API_NAMES) - set(aiotasks.__all__))
    assert missing == []


def test_all_is_sorted_and_unique() -> None:
    assert list(aiotasks.__all__) == sorted(aiotasks.__all__)
    assert len(set(aiotasks.__all__)) == len(aiotasks.__all__)


def test_every_exported_name_exists() -> None:
    absent = [n for n in aiotasks.__all__ if not hasattr(aiotasks, n)]
    assert absent == []


@pytest.mark.parametrize("name", API_NAMES)
def test_api_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from aiotasks import {name}", namespace)
    assert namespace[name] is getattr(aiotasks, name)


@pytest.mark.parametrize("name", [n for n in aiotasks.__all__ if not n.startswith("__")])
def test_exported_name_has_its_own_docstring(name: str) -> None:
    obj = getattr(aiotasks, name)
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    assert doc and doc.strip(), f"{name} has no docstring"
    # A dataclass without a docstring gets its signature as __doc__: that does not count.
    assert not doc.startswith(f"{name}("), f"{name} has only the generated docstring"


def test_version_is_a_string() -> None:
    assert isinstance(aiotasks.__version__, str) and aiotasks.__version__


@pytest.mark.parametrize("name", ERRORS)
def test_every_error_derives_from_aiotasks_error(name: str) -> None:
    cls = getattr(aiotasks, name)
    assert issubclass(cls, aiotasks.AiotasksError)
    assert issubclass(cls, Exception)


def test_errors_mix_in_the_builtin_they_refine() -> None:
    assert issubclass(aiotasks.TimeLimitExceeded, TimeoutError)
    assert issubclass(aiotasks.ResultTimeout, TimeoutError)
    assert issubclass(aiotasks.BrokerConnectionError, ConnectionError)
    assert issubclass(aiotasks.ChordError, aiotasks.TaskFailed)


def test_retry_is_control_flow_not_an_error() -> None:
    assert issubclass(aiotasks.Retry, Exception)
    assert not issubclass(aiotasks.Retry, aiotasks.AiotasksError)


def test_task_failed_carries_the_remote_details() -> None:
    err = aiotasks.TaskFailed("abc", "ValueError", "bad value", "Traceback ...")
    assert (err.task_id, err.exc_type, err.exc_message, err.traceback) == (
        "abc",
        "ValueError",
        "bad value",
        "Traceback ...",
    )
    assert "ValueError" in str(err) and "bad value" in str(err) and "abc" in str(err)


def test_task_state_values() -> None:
    names = {s.name for s in aiotasks.TaskState}
    assert names == {"PENDING", "SCHEDULED", "STARTED", "SUCCESS", "FAILURE", "REVOKED"}
    assert aiotasks.TaskState.SUCCESS == "SUCCESS"


@pytest.mark.parametrize("namespace", ["", "a{b", "a}b", 7])
def test_a_namespace_no_key_could_carry_is_refused(namespace: object) -> None:
    """The namespace is the keys' hash tag: empty, or with a brace, it is no tag."""
    with pytest.raises(ValueError, match="namespace must be a non-empty name"):
        aiotasks.App(namespace=namespace)  # type: ignore[arg-type]
    app = aiotasks.App()
    with pytest.raises(ValueError, match="namespace must be"):
        app.configure(namespace=namespace)


@pytest.mark.parametrize(
    ("rate", "says"),
    [("abc", "got 'abc'"), ("5/x", "got '5/x'"), (-5, "positive, got -5")],
)
def test_a_bad_rate_limit_names_what_was_given(rate: object, says: str) -> None:
    app = aiotasks.App()
    with pytest.raises(ValueError, match=f"rate_limit must .*{says}$"):

        @app.task(rate_limit=rate)  # type: ignore[call-overload]
        async def limited() -> None: ...

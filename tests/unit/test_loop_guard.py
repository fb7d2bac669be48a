"""loop_guard (tests/loop_guard.py) fails asyncio tests that leak tasks or drop exceptions."""

import loop_guard
import pytest

pytest_plugins = ["pytester"]

INNER = """
import asyncio

import pytest


async def forgotten():
    await asyncio.sleep(3600)


async def boom():
    raise RuntimeError("kaboom from a task")


async def test_leaks_a_task():
    asyncio.create_task(forgotten(), name="forgotten-sleeper")
    await asyncio.sleep(0)


async def test_drops_a_task_exception():
    task = asyncio.create_task(boom())
    await asyncio.sleep(0)
    assert task.done()
    del task


async def test_raises_in_a_callback():
    def bad_callback():
        raise ValueError("kaboom from a callback")

    asyncio.get_running_loop().call_soon(bad_callback)
    await asyncio.sleep(0)


async def test_clean():
    task = asyncio.create_task(boom())
    with pytest.raises(RuntimeError):
        await task
    await asyncio.wait_for(asyncio.sleep(0), 1.0)


@pytest.mark.allow_leaks("forgotten() is left running on purpose")
async def test_allowed_leak():
    asyncio.create_task(forgotten(), name="allowed-sleeper")
    await asyncio.sleep(0)


@pytest.mark.allow_leaks
async def test_allowed_leak_without_a_reason():
    asyncio.create_task(forgotten(), name="unexplained-sleeper")
    await asyncio.sleep(0)


def test_sync_tests_are_left_alone():
    assert asyncio.run(asyncio.sleep(0, "done")) == "done"
"""


def teardown_error(outcome: pytest.RunResult, test: str) -> str:
    """The text of the teardown error of one inner test."""
    text = outcome.stdout.str()
    start = text.index(f"ERROR at teardown of {test}")
    end = text.find("_ ERROR at teardown of ", start + 1)
    return text[start : end if end != -1 else text.index("short test summary info")]


def test_leaks_and_unhandled_exceptions_fail_at_teardown_and_clean_tests_pass(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )
    pytester.makepyfile(test_inner=INNER)
    outcome = pytester.runpytest("--strict-markers", "-rA", plugins=[loop_guard])

    # Every test body passes; the guard adds one teardown error to each bad test.
    outcome.assert_outcomes(passed=7, errors=4)
    outcome.stdout.fnmatch_lines(
        [
            "PASSED test_inner.py::test_clean",
            "PASSED test_inner.py::test_allowed_leak",
            "PASSED test_inner.py::test_sync_tests_are_left_alone",
            "ERROR test_inner.py::test_leaks_a_task - Failed: loop_guard*",
            "ERROR test_inner.py::test_drops_a_task_exception - Failed: loop_guard*",
            "ERROR test_inner.py::test_raises_in_a_callback - Failed: loop_guard*",
            "ERROR test_inner.py::test_allowed_leak_without_a_reason - Failed: loop_guard*",
        ],
        consecutive=False,
    )

    leak = teardown_error(outcome, "test_leaks_a_task")
    assert "1 task(s) still pending after the test (leaked; now cancelled)" in leak
    assert "task 'forgotten-sleeper' running forgotten() at " in leak and "test_inner.py:" in leak

    dropped = teardown_error(outcome, "test_drops_a_task_exception")
    assert "Task exception was never retrieved" in dropped
    assert "RuntimeError: kaboom from a task" in dropped
    assert "still pending" not in dropped

    callback = teardown_error(outcome, "test_raises_in_a_callback")
    assert "Exception in callback" in callback
    assert "ValueError: kaboom from a callback" in callback

    unexplained = teardown_error(outcome, "test_allowed_leak_without_a_reason")
    assert "@pytest.mark.allow_leaks needs a reason" in unexplained
    assert "unexplained-sleeper" not in unexplained

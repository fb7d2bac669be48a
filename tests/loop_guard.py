"""A pytest plugin that fails an asyncio test which leaves its event loop unclean.

For every test that pytest-asyncio runs on its loop, the autouse fixture ``loop_guard``
installs an exception handler on that loop for the duration of the test and, at teardown
(after the test's other fixtures are gone):

- fails if anything reached ``loop.call_exception_handler``: an exception in a callback, a
  task whose exception was never retrieved, a task destroyed while pending;
- fails if a task the test started is still pending (a leaked task), naming it and the
  coroutine it runs; the leaked tasks are then cancelled so the next test starts clean.

``@pytest.mark.allow_leaks("reason")`` lets one test leave tasks pending (they are still
cancelled); the reason is required and should name the
code that leaks. Unhandled exceptions are never allowed.

Tests that run their own loop (``asyncio.run``, a loop on a thread) are not covered.
tests/conftest.py registers this plugin; an inner pytest run loads it with ``-p loop_guard``.
"""

from __future__ import annotations

import asyncio
import gc
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from pytest_asyncio import is_async_test

MARKER = "allow_leaks"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(reason): the test may leave asyncio tasks pending at teardown (loop_guard);"
        " the reason names the code that leaks them",
    )


def _loop_scope(item: pytest.Item) -> str:
    marker = item.get_closest_marker("asyncio")
    scope = marker.kwargs.get("loop_scope") if marker is not None else None
    return scope or item.config.getini("asyncio_default_test_loop_scope") or "function"


def describe_context(context: dict[str, Any]) -> str:
    """One entry of the report: the handler's message, what it was about, the traceback."""
    lines = [str(context.get("message") or "unhandled exception in the event loop")]
    for key in ("task", "future", "handle"):
        if key in context:
            lines.append(f"  {key}: {context[key]!r}")
            break
    exc = context.get("exception")
    if exc is not None:
        lines.append("  " + "".join(traceback.format_exception(exc)).rstrip().replace("\n", "\n  "))
    return "\n".join(lines)


def describe_task(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    name = getattr(coro, "__qualname__", repr(coro))
    frame = getattr(coro, "cr_frame", None)
    where = f" at {frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else ""
    return f"task {task.get_name()!r} running {name}(){where}\n  {task!r}"


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    done, _ = await asyncio.wait(tasks, timeout=5.0)
    for task in done:  # retrieved: the leak is what gets reported, not how it ended
        if not task.cancelled():
            task.exception()


@pytest.fixture(autouse=True)
def loop_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    item = request.node
    if not (isinstance(item, pytest.Function) and is_async_test(item)):
        yield
        return
    # The runner's fixture is set up before this one, so it closes the loop after this check.
    runner: asyncio.Runner = request.getfixturevalue(f"_{_loop_scope(item)}_scoped_runner")
    loop = runner.get_loop()
    before = set(asyncio.all_tasks(loop))
    caught: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: caught.append(context))
    try:
        yield
        gc.collect()  # a dropped task reports "exception was never retrieved" when collected
        leaked = sorted(
            (t for t in asyncio.all_tasks(loop) if not t.done() and t not in before),
            key=lambda t: t.get_name(),
        )
        described = [describe_task(t) for t in leaked]
        if leaked:
            runner.run(_cancel(leaked))
            gc.collect()
    finally:
        loop.set_exception_handler(previous)
    problems = []
    if caught:
        problems.append(
            f"{len(caught)} unhandled exception(s) in the event loop:\n"
            + "\n".join(describe_context(c) for c in caught)
        )
    allowed = item.get_closest_marker(MARKER)
    if allowed is not None and not (allowed.args and str(allowed.args[0]).strip()):
        problems.append(f"@pytest.mark.{MARKER} needs a reason naming the code that leaks")
    if described and allowed is None:
        problems.append(
            f"{len(described)} task(s) still pending after the test (leaked; now cancelled):\n"
            + "\n".join(described)
        )
    if problems:
        pytest.fail(f"loop_guard: {item.nodeid}\n" + "\n".join(problems), pytrace=False)

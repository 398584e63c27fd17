"""`held_logs`: log records wait until the block succeeds, then print through the loggers' own handlers, in order;
a refused block prints none of them. Held by a logging handler, with no method of `logging.Logger` replaced."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from gradual.lightning_cli import held_logs


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A handler on a non-propagating `held_test` logger (as Lightning's loggers are), and a root handler."""
    out = io.StringIO()
    own, root = logging.StreamHandler(out), logging.StreamHandler(out)
    own.setFormatter(logging.Formatter("own %(name)s %(message)s"))
    root.setFormatter(logging.Formatter("root %(name)s %(message)s"))
    logger = logging.getLogger("held_test")
    logger.addHandler(own)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logging.getLogger().addHandler(root)
    try:
        yield out
    finally:
        logger.removeHandler(own)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
        logging.getLogger().removeHandler(root)


def test_records_wait_for_the_block_and_print_in_order(stream: io.StringIO) -> None:
    call_handlers = logging.Logger.callHandlers
    with held_logs():
        logging.getLogger("held_test.child").info("first")
        logging.getLogger("held_propagating").warning("second")
        logging.getLogger("held_test").info("third")
        assert stream.getvalue() == "" and logging.Logger.callHandlers is call_handlers
    assert stream.getvalue().splitlines() == ["own held_test.child first", "root held_propagating second",
                                              "own held_test third"]


def test_a_refused_block_prints_nothing_and_handlers_come_back(stream: io.StringIO) -> None:
    logger = logging.getLogger("held_test")
    handlers, root_handlers = list(logger.handlers), list(logging.getLogger().handlers)
    with pytest.raises(ValueError, match="refused"), held_logs():
        logger.info("not shown")
        raise ValueError("refused")
    with held_logs(replay=False):
        logger.info("not shown either")
    assert stream.getvalue() == ""
    assert logger.handlers == handlers and logging.getLogger().handlers == root_handlers


def test_nested_blocks_and_a_handler_added_inside(stream: io.StringIO) -> None:
    """The inner block hands its records to the outer one; a handler added inside prints at once, once, and stays."""
    logger = logging.getLogger("held_test")
    extra = logging.StreamHandler(stream)
    extra.setFormatter(logging.Formatter("extra %(message)s"))
    try:
        with held_logs():
            with held_logs():
                logger.info("inner")
            logger.addHandler(extra)
            logger.info("outer")
            assert stream.getvalue().splitlines() == ["extra outer"]
        assert stream.getvalue().splitlines() == ["extra outer", "own held_test inner", "own held_test outer"]
        assert logger.handlers[-1] is extra
        logger.info("after")
        assert stream.getvalue().splitlines()[-2:] == ["own held_test after", "extra after"]
    finally:
        logger.removeHandler(extra)

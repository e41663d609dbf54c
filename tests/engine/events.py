"""Collect an engine event stream the way the tests compare runs."""

from engine.api import Finished, TextDelta


def collect_ids(events) -> tuple[list[int], list[bool], Finished | None]:
    """(token ids, drafted flags, the Finished event) of a generation."""
    ids, flags, final = [], [], None
    for event in events:
        if isinstance(event, TextDelta):
            ids += event.token_ids
            flags += event.drafted
        elif isinstance(event, Finished):
            final = event
    return ids, flags, final

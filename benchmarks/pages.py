"""Docs pages that quote a benchmark: its script rewrites only the text between its markers."""

from __future__ import annotations

from pathlib import Path

from kdistill.checkpoint import atomic_write_text


def results_markers(script: str) -> tuple[str, str]:
    """The comments around the part of a page that ``script`` writes."""
    return f"<!-- results: benchmarks/{script} -->", "<!-- /results -->"


def with_results(page: str, tables: str, script: str) -> str:
    """``page`` with the text between ``script``'s markers replaced by ``tables`` (the rest of
    the page, written by hand, is kept); a page without markers gets them at its end."""
    start, end = results_markers(script)
    begins = page.find(start)
    ends = page.find(end, begins) if begins >= 0 else -1  # this script's end, not an earlier one
    if ends < 0:
        return f"{page}{start}\n{tables}{end}\n"
    return page[:begins] + f"{start}\n{tables}{end}" + page[ends + len(end):]


def write_results(path: Path, tables: str, script: str) -> None:
    """Put ``tables`` between ``script``'s markers in the page at ``path`` (atomically)."""
    atomic_write_text(path, with_results(path.read_text() if path.is_file() else "", tables,
                                         script))


def publish_results(tables: str, page: Path, quick_output: Path | None, script: str) -> None:
    """Write ``tables`` between ``script``'s markers of the docs ``page``, or of the page
    beside ``quick_output`` (its ``.md``) for a smoke run, and print them."""
    write_results(page if quick_output is None else quick_output.with_suffix(".md"), tables,
                  script)
    print(tables)


def load_note(runs: list[dict]) -> str:
    """The range of the 1-minute load average saved at the end of each run (``load_average``),
    as a sentence for a results page; empty without runs."""
    loads = [run["load_average"][0] for run in runs]
    if not loads:
        return ""
    return f"Load average (1 min) at the end of the runs: {min(loads):.2f} to {max(loads):.2f}.\n"

"""Presentation in one place: tables and charts of what runs, sweeps and ladders measured.

`compare`: the method ladder's report (ladder.json, report.md, ladder.png) and the prompt lab's
table; `sweep`: a sweep's ranked table and its figure. Nothing here computes a number that a run
did not record, except ratios of recorded numbers.
"""

from lorafleet.report.compare import REPORT_FILES, ladder_chart, load_rows, markdown_table, prompt_table, write_report
from lorafleet.report.sweep import build_table, plot, print_table

__all__ = [
    "REPORT_FILES",
    "markdown_table",
    "ladder_chart",
    "write_report",
    "load_rows",
    "prompt_table",
    "build_table",
    "print_table",
    "plot",
]

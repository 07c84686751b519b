"""Spreadsheet formula injection (OWASP "CSV Injection"): a CSV cell that begins with ``=``, ``+``, ``-``, ``@``, a
tab or a carriage return is run as a formula by Excel, LibreOffice and Google Sheets when the file is opened.

Every CSV the portal writes passes its text cells through :func:`neutralise_cell`, which puts a single quote in front
of such a cell (spreadsheets show the text and run nothing). A cell that already begins with a quote gets one more,
so the escape is reversible: :func:`restore_cell` drops one leading quote and gives back exactly the stored value
(what the audit chain hashes, and what ``scripts/verify_export.py`` recomputes).
"""

from __future__ import annotations

from typing import Any

FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
ESCAPE = "'"
# Written into audit export manifests, so a verifier knows how to get the stored values back.
ESCAPE_RULE = ("a text cell beginning with =, +, -, @, tab, carriage return or ' is written with ' in front "
               "(OWASP CSV injection); remove one leading ' from a cell that begins with it to get the stored value")


def neutralise_cell(value: Any, *, reversible: bool = True) -> Any:
    """``value`` with a leading ``'`` when it is text a spreadsheet would run (and, when the escape must be
    reversible, when it already begins with ``'``); anything that is not text is returned as it is."""
    if isinstance(value, str) and value.startswith((*FORMULA_TRIGGERS, ESCAPE) if reversible else FORMULA_TRIGGERS):
        return ESCAPE + value
    return value


def restore_cell(text: str) -> str:
    return text[1:] if text.startswith(ESCAPE) else text


# The same rule for PostgreSQL's COPY: ``sql`` is a text expression.
def neutralise_sql(sql: str) -> str:
    return (f"(CASE WHEN left({sql}, 1) IN ('=', '+', '-', '@', E'\\t', E'\\r', '''') "
            f"THEN '''' || {sql} ELSE {sql} END)")

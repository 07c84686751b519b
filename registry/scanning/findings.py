from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Finding:
    """One thing the scanner saw: ``severity`` is ``block`` (the upload is refused), ``wait`` (it waits for a
    person's decision) or ``info``; ``member`` names the file inside an archive."""

    severity: str
    code: str
    message: str
    member: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class UploadRejected(Exception):
    def __init__(self, findings: list[Finding]) -> None:
        super().__init__("; ".join(f.message for f in findings))
        self.findings = findings

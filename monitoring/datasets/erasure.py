"""Erasure reaches training data: the snapshots holding a subject's rows are rewritten without them (a new content
hash; the manifest's ``chain`` keeps the old hash and the erasure receipt), the old file is deleted, and every version
trained on such a snapshot is flagged "trained on erased data" until a compliance officer decides.

The work is split around the erasure's transaction: :func:`erasure_prepare` (before it, no lock held) finds the
snapshots by reading only their ``subject_hash`` column and writes and stores the new files; :func:`erasure_apply`
(inside it, after the receipt event) points the snapshots at them, records the chain, flags the versions and writes
the audit events; :func:`erasure_cleanup` (after it) deletes the old files.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from django.utils import timezone

from monitoring.datasets.cut import _tmp_path, snapshot_target, write_filtered
from monitoring.models import DatasetSnapshot, ErasedDataFlag, SnapshotStatus, TrainingLink
from portal.audit.actions import AuditAction
from portal.audit.record import Target, audit_record
from registry import storage
from registry.models import Blob

logger = logging.getLogger(__name__)


class ErasureConflict(Exception):
    """A snapshot changed between preparing and applying an erasure (another erasure rewrote it): ask again."""


@dataclass
class Rewrite:
    snapshot_id: int
    uid: str
    model: str
    old_sha256: str
    old_blob_id: int
    new_blob_id: int
    new_sha256: str
    rows_removed: int
    rows: int
    labelled: int
    per_version: dict[str, int]


@dataclass
class ErasurePlan:
    digest: str
    rewrites: list[Rewrite] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        versions = [{"model": m, "version": n, "snapshot": str(s)} for m, n, s in TrainingLink.objects.filter(
            snapshot_id__in=[r.snapshot_id for r in self.rewrites]).values_list(
            "version__model__name", "version__number", "snapshot__uid").order_by("version__model__name",
                                                                               "version__number")]
        return {"snapshots": [{"snapshot": r.uid, "model": r.model, "old_sha256": r.old_sha256,
                               "new_sha256": r.new_sha256, "rows_removed": r.rows_removed} for r in self.rewrites],
                "versions_trained_on_them": versions}


def _holds(path: Any, digest: str) -> int:
    """How many rows of the Parquet file at ``path`` carry ``digest``, reading only that column."""
    found = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=["subject_hash"], batch_size=65_536):
        found += int(pc.sum(pc.fill_null(pc.equal(batch.column(0), pa.scalar(digest)), False)).as_py() or 0)
    return found


def _row_groups(path: Any) -> Iterator[pa.Table]:
    source = pq.ParquetFile(path)
    for index in range(source.num_row_groups):
        yield source.read_row_group(index)


def erasure_prepare(digest: str) -> ErasurePlan:
    plan = ErasurePlan(digest)
    for snapshot in DatasetSnapshot.objects.select_related("model", "blob").filter(status=SnapshotStatus.READY,
                                                                                    blob__isnull=False):
        assert snapshot.blob is not None
        with storage.verified_local_path(snapshot.blob) as path:
            if not _holds(path, digest):
                continue
            schema = pq.ParquetFile(path).schema_arrow
            out = _tmp_path(f"erasure-{snapshot.uid}-")
            written = write_filtered(_row_groups(path), schema, {digest}, out)
        blob = storage.blob_put_moved(out, sha256=written.sha256, size=written.size)
        plan.rewrites.append(Rewrite(snapshot.pk, str(snapshot.uid), snapshot.model.name, snapshot.sha256,
                                     snapshot.blob.pk, blob.pk, written.sha256, written.dropped, written.rows,
                                     written.labelled, written.per_version))
    return plan


def erasure_apply(plan: ErasurePlan, *, models: set[str], event: Any, actor: Any) -> dict[str, Any]:
    """Inside the erasure's transaction, after its receipt event: rewrite pointers, chain, flags, audit events.
    Snapshots still being cut for the subject's models leave the subject out when they finish."""
    receipt = {"audit_event_seq": event.seq, "audit_event_hash": event.hash}
    now = timezone.now()
    flagged: list[dict[str, Any]] = []
    for rewrite in plan.rewrites:
        snapshot = DatasetSnapshot.objects.select_for_update().select_related("model__team").get(pk=rewrite.snapshot_id)
        if snapshot.sha256 != rewrite.old_sha256:
            raise ErasureConflict(f"snapshot {snapshot.uid} changed while the erasure was prepared")
        manifest = dict(snapshot.manifest)
        chain = list(manifest.get("chain", []))
        chain.append({"sha256": rewrite.old_sha256, "replaced_by": rewrite.new_sha256, "at": now.isoformat(),
                      "rows_removed": rewrite.rows_removed, "reason": "GDPR erasure", "receipt": receipt})
        new_blob = Blob.objects.get(pk=rewrite.new_blob_id)
        manifest.update(sha256=rewrite.new_sha256, size=new_blob.size, rows=rewrite.rows,
                        labelled_rows=rewrite.labelled,
                        label_coverage=round(rewrite.labelled / rewrite.rows, 6) if rewrite.rows else 0.0,
                        rows_per_version=rewrite.per_version, chain=chain)
        DatasetSnapshot.objects.filter(pk=snapshot.pk).update(blob=new_blob, sha256=rewrite.new_sha256,
                                                              size=new_blob.size, manifest=manifest,
                                                              rows_done=rewrite.rows)
        audit_record(AuditAction.DATASET_ERASE_ROWS, actor=actor, target=snapshot_target(snapshot),
                     before={"sha256": rewrite.old_sha256}, after={"sha256": rewrite.new_sha256,
                                                                 "rows_removed": rewrite.rows_removed,
                                                                 "rows": rewrite.rows},
                     metadata={"erasure_receipt": receipt})
        for link in TrainingLink.objects.select_related("version__model__team").filter(snapshot=snapshot):
            version = link.version
            flag = ErasedDataFlag.objects.create(version=version, snapshot=snapshot, erasure_seq=event.seq,
                                                 erasure_hash=event.hash, rows_removed=rewrite.rows_removed)
            audit_record(AuditAction.VERSION_ERASED_DATA_FLAG, actor=actor,
                         target=Target("modelversion", str(version.uid), str(version), version.model.team.slug),
                         after={"flag": str(flag.uid), "snapshot": str(snapshot.uid),
                                "trained_on_sha256": link.snapshot_sha256, "rows_removed": rewrite.rows_removed},
                         metadata={"erasure_receipt": receipt})
            flagged.append({"model": version.model.name, "version": version.number, "flag": str(flag.uid),
                            "snapshot": str(snapshot.uid)})
    pending = []
    for snapshot in DatasetSnapshot.objects.select_for_update().filter(
            status__in=(SnapshotStatus.PENDING, SnapshotStatus.RUNNING), model__name__in=models):
        if plan.digest not in snapshot.erase_subjects:
            DatasetSnapshot.objects.filter(pk=snapshot.pk).update(erase_subjects=[*snapshot.erase_subjects,
                                                                                  plan.digest])
        pending.append(str(snapshot.uid))
    return {"snapshots": [{"snapshot": r.uid, "model": r.model, "old_sha256": r.old_sha256,
                           "new_sha256": r.new_sha256, "rows_removed": r.rows_removed} for r in plan.rewrites],
            "rows_removed": sum(r.rows_removed for r in plan.rewrites),
            "versions_flagged": flagged, "snapshots_being_cut": pending}


def erasure_cleanup(plan: ErasurePlan) -> None:
    """After commit: the old files held the subject's rows, so they go (unless another snapshot has the same bytes)."""
    for rewrite in plan.rewrites:
        if DatasetSnapshot.objects.filter(blob_id=rewrite.old_blob_id).exists():
            continue
        blob = Blob.objects.filter(pk=rewrite.old_blob_id).first()
        if blob is not None and not storage.blob_delete_if_unused(blob):
            logger.warning("Old snapshot file %s is still referenced; not deleted", blob.sha256[:12])


def erasure_abandon(plan: ErasurePlan) -> None:
    """The erasure's transaction failed: drop the rewritten files nobody points at."""
    for rewrite in plan.rewrites:
        if not DatasetSnapshot.objects.filter(blob_id=rewrite.new_blob_id).exists():
            blob = Blob.objects.filter(pk=rewrite.new_blob_id).first()
            if blob is not None:
                storage.blob_delete_if_unused(blob)


def subject_snapshots(digest: str) -> list[dict[str, Any]]:
    """For a subject access request: the ready snapshots holding the subject's rows, and how many."""
    held = []
    for snapshot in DatasetSnapshot.objects.select_related("model", "blob").filter(status=SnapshotStatus.READY,
                                                                                    blob__isnull=False):
        assert snapshot.blob is not None
        with storage.verified_local_path(snapshot.blob) as path:
            rows = _holds(path, digest)
        if rows:
            held.append({"snapshot": str(snapshot.uid), "model": snapshot.model.name,
                         "environment": snapshot.environment, "sha256": snapshot.sha256, "rows": rows})
    return held


"""PromotionRequest.approvers_notified_at: when approvers were asked to decide. Requests made before it existed were
notified at their request unless a gate blocked them then (their gates as recorded say which)."""

from django.db import migrations, models


def backfill(apps, schema_editor):
    PromotionRequest = apps.get_model("registry", "PromotionRequest")
    for promotion in PromotionRequest.objects.all().only("pk", "gates", "created_at"):
        if not any(gate.get("blocks") for gate in promotion.gates or []):
            PromotionRequest.objects.filter(pk=promotion.pk).update(approvers_notified_at=promotion.created_at)


class Migration(migrations.Migration):

    dependencies = [
        ("registry", "0010_version_explanation"),
    ]

    operations = [
        migrations.AddField(
            model_name="promotionrequest",
            name="approvers_notified_at",
            field=models.DateTimeField(blank=True, help_text="When approvers were asked to decide: at the request, or (a gate blocked it) when its last blocking gate cleared. Empty while it is blocked.", null=True),
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]

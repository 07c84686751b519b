from __future__ import annotations

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("registry", "0006_mlflow_source")]

    operations = [
        migrations.AddField(model_name="modelversion", name="tags",
                            field=models.JSONField(blank=True, default=list)),
    ]

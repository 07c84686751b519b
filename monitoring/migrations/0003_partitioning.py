"""The prediction log (by day) and the rollups (by month) become natively partitioned tables on PostgreSQL.

The primary key gains the partition column (PostgreSQL requires it): (id, created_at) and (id, start). Django still
addresses rows by ``id``; prediction ids are unique by construction and a replayed record carries its original
time, so ``ON CONFLICT DO NOTHING`` still inserts it once. Existing rows are copied into partitions made for them.
On SQLite nothing changes.
"""

import datetime as dt

from django.db import migrations

def partition(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    from monitoring import partitions

    tables = [(spec.table, spec.column, spec.unit) for spec in partitions.SPECS]
    indexes_of, uniques_of = {}, {}
    with schema_editor.connection.cursor() as cursor:
        for table, column, _unit in tables:
            cursor.execute("SELECT conname, contype, pg_get_constraintdef(oid) FROM pg_constraint "
                           "WHERE conrelid = %s::regclass AND contype IN ('p', 'u')", [table])
            constraints = cursor.fetchall()
            uniques_of[table] = [(name, definition) for name, kind, definition in constraints if kind == "u"]
            cursor.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", [table])
            owned = {name for name, _kind, _definition in constraints}
            indexes_of[table] = [(name, definition) for name, definition in cursor.fetchall() if name not in owned]
            for name, _definition in uniques_of[table]:
                cursor.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
            for name, kind, _definition in constraints:
                if kind == "p":
                    cursor.execute(f'ALTER TABLE {table} RENAME CONSTRAINT "{name}" TO "{table}_unpartitioned_pkey"')
            if table == "monitoring_rollup":  # PostgreSQL 15 has no identity columns on partitioned tables
                cursor.execute(f"ALTER TABLE {table} ALTER COLUMN id DROP IDENTITY IF EXISTS")
            cursor.execute(f"ALTER TABLE {table} RENAME TO {table}_unpartitioned")
            cursor.execute(f"CREATE TABLE {table} (LIKE {table}_unpartitioned INCLUDING DEFAULTS INCLUDING "
                           f"CONSTRAINTS) PARTITION BY RANGE ({column})")
            if table == "monitoring_rollup":
                cursor.execute(f"CREATE SEQUENCE {table}_id_seq OWNED BY {table}.id")
                cursor.execute(f"ALTER TABLE {table} ALTER COLUMN id SET DEFAULT nextval('{table}_id_seq')")
            cursor.execute(f"ALTER TABLE {table} ADD PRIMARY KEY (id, {column})")
            cursor.execute(f"CREATE TABLE {table}_default PARTITION OF {table} DEFAULT")
        # A partition for each day (month) that holds rows, besides those around now.
        extra = {}
        for table, column, unit in tables:
            # Identifiers from partitions.SPECS (constants), the value bound: S608 does not apply.
            cursor.execute(f"SELECT DISTINCT date_trunc(%s, {column} AT TIME ZONE 'UTC') FROM {table}_unpartitioned",  # noqa: S608
                           [unit])
            extra[table] = [start.replace(tzinfo=dt.UTC) for (start,) in cursor.fetchall()]
    partitions.partitions_ensure(extra_starts=extra)
    with schema_editor.connection.cursor() as cursor:
        for table, _column, _unit in tables:
            cursor.execute(f"INSERT INTO {table} SELECT * FROM {table}_unpartitioned")  # noqa: S608 - SPECS' table
            cursor.execute(f"DROP TABLE {table}_unpartitioned")
        cursor.execute("SELECT setval('monitoring_rollup_id_seq', GREATEST((SELECT max(id) FROM monitoring_rollup), 0) "
                       "+ 1, false)")
        for table, _column, _unit in tables:
            for _name, definition in indexes_of[table]:
                cursor.execute(definition)
            for name, definition in uniques_of[table]:
                cursor.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
        cursor.execute("ANALYZE monitoring_predictionlog")
        cursor.execute("ANALYZE monitoring_rollup")


class Migration(migrations.Migration):
    atomic = True

    dependencies = [("monitoring", "0002_monitoring")]

    operations = [migrations.RunPython(partition, migrations.RunPython.noop, elidable=False)]

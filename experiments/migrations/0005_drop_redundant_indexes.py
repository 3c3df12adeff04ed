"""Indexes that others cover: each of these columns starts a composite index or unique
constraint already (exp_project_list_idx, one_step_per_name, one_chunk_per_seq,
one_delivery_per_id), and body_digest's LIKE twin was never used. One webhook delivery writes
nine fewer index entries. Only the indexes go: Django's AlterField would also drop and re-add
each foreign key, re-checking every row of the log chunks' table."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0004_engine_watch"),
        ("projects", "0002_named_tokens"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="experiment",
                    name="project",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="experiments",
                        to="projects.project",
                    ),
                ),
                migrations.AlterField(
                    model_name="logchunk",
                    name="experiment",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="log_chunks",
                        to="experiments.experiment",
                    ),
                ),
                migrations.AlterField(
                    model_name="step",
                    name="experiment",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="steps",
                        to="experiments.experiment",
                    ),
                ),
                migrations.AlterField(
                    model_name="webhookdelivery",
                    name="body_digest",
                    field=models.CharField(blank=True, max_length=64),
                ),
                migrations.AlterField(
                    model_name="webhookdelivery",
                    name="project",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="webhook_deliveries",
                        to="projects.project",
                    ),
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    [
                        'DROP INDEX IF EXISTS "experiments_experiment_project_id_16f1a28b"',
                        'DROP INDEX IF EXISTS "experiments_logchunk_experiment_id_9ce29793"',
                        'DROP INDEX IF EXISTS "experiments_step_experiment_id_2673d611"',
                        'DROP INDEX IF EXISTS "experiments_webhookdelivery_body_digest_a86f99cd"',
                        'DROP INDEX IF EXISTS "experiments_webhookdelivery_body_digest_a86f99cd_like"',
                        'DROP INDEX IF EXISTS "experiments_webhookdelivery_project_id_e8489cf1"',
                    ],
                    reverse_sql=migrations.RunSQL.noop,
                ),
            ],
        ),
        migrations.AddIndex(
            model_name="webhookdelivery",
            index=models.Index(fields=["body_digest"], name="delivery_body_idx"),
        ),
    ]

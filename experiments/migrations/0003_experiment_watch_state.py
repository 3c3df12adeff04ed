from django.db import migrations, models

BOOKKEEPING = ("cursors", "logs_collected", "decisive")


def move_bookkeeping(apps, schema_editor) -> None:
    """Experiments watched while the server is upgraded keep their log cursors: without them the
    next watch would store every process's output a second time."""
    Experiment = apps.get_model("experiments", "Experiment")
    for experiment in Experiment.objects.filter(status__in=["Created", "Processing"]).exclude(handle=None):
        handle = experiment.handle or {}
        state = {key: handle[key] for key in BOOKKEEPING if key in handle}
        if state:
            # `decisive` stays in the handle as well: the single-host engines read it there.
            for key in ("cursors", "logs_collected"):
                handle.pop(key, None)
            experiment.handle, experiment.watch_state = handle, state
            experiment.save(update_fields=["handle", "watch_state"])


class Migration(migrations.Migration):
    dependencies = [
        ("experiments", "0002_limits_and_replays"),
    ]

    operations = [
        migrations.AddField(
            model_name="experiment",
            name="watch_state",
            field=models.JSONField(blank=True, default=dict),
        ),
        migrations.RunPython(move_bookkeeping, migrations.RunPython.noop),
    ]

"""Scalar series of an experiment: what its processes printed as `AICHOR_METRIC` lines and what
it wrote to TensorBoard event files. Points are kept in chunk rows of JSON arrays (one row per
few thousand points, not per point), each with a min/max summary, so a chart of 100 000 steps
reads a few kilobytes."""

from django.db import models

from experiments.models import Experiment


class Series(models.Model):
    class Source(models.TextChoices):
        STDOUT = "stdout", "AICHOR_METRIC lines"
        TENSORBOARD = "tensorboard", "TensorBoard event files"

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="metric_series")
    name = models.CharField(max_length=255)
    source = models.CharField(max_length=16, choices=Source.choices)
    count = models.PositiveIntegerField(default=0)
    last_step = models.BigIntegerField(null=True)
    last_value = models.FloatField(null=True)
    min_value = models.FloatField(null=True)
    max_value = models.FloatField(null=True)
    # Polling asks for the series changed since its last answer (indexed with the experiment).
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["experiment", "name"], name="metric_series_unique_name")]
        indexes = [models.Index(fields=["experiment", "updated_at"])]

    def __str__(self) -> str:
        return self.name

    @property
    def lower_is_better(self) -> bool:
        lowered = self.name.lower()
        return any(word in lowered for word in LOWER_IS_BETTER)

    @property
    def best_value(self) -> float | None:
        return self.min_value if self.lower_is_better else self.max_value


# Names whose smallest value is the best one; any other series is best at its largest.
LOWER_IS_BETTER = ("loss", "err", "mse", "mae", "rmse", "perplexity", "ppl", "cost", "wer", "cer", "time")


class Chunk(models.Model):
    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="chunks")
    seq = models.PositiveIntegerField()
    steps = models.JSONField(default=list)
    values = models.JSONField(default=list)
    # Min/max of each bucket of FINE or COARSE points (metrics.services), as [steps, values]: what a
    # chart of a long series reads. Columns of their own: a read of the small coarse one never
    # decompresses the points or the fine one.
    fine = models.JSONField(default=list)
    coarse = models.JSONField(default=list)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["series", "seq"], name="metric_chunk_unique_seq")]


class EventFile(models.Model):
    """How far a TensorBoard event file was read: the next read starts at `offset`."""

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="event_files")
    path = models.CharField(max_length=1024)  # relative to the experiment's TensorBoard folder
    offset = models.BigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["experiment", "path"], name="metric_event_file_unique")]

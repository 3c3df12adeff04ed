"""Log writers: a stream written by several writers one after another (a step retried, a watcher
restarted) reads as one log, numbered on, with nothing overwritten."""

import pytest
from django.db import transaction

from experiments import services
from experiments.logs import LogWriter, append_log, log_text
from experiments.models import LogChunk

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def experiment(project):
    return services.create_experiment(
        project=project, message="aichor[t.yaml]: x", manifest_path="aichor_manifests/t.yaml"
    )


def test_a_later_writer_continues_the_stream(experiment):
    append_log(experiment.pk, "step:Building", "first attempt\nline 2\n")
    with LogWriter(experiment.pk, "step:Building") as writer:  # the step again, on another worker
        writer.line("second attempt")
        writer.flush()
        writer.line("done")
    assert log_text(experiment.pk, "step:Building") == "first attempt\nline 2\nsecond attempt\ndone\n"
    chunks = list(LogChunk.objects.filter(experiment=experiment, stream="step:Building").order_by("seq"))
    assert [(c.seq, c.first_line, c.line_count) for c in chunks] == [(0, 0, 2), (1, 2, 1), (2, 3, 1)]


def test_two_writers_at_once_interleave_whole_chunks(experiment):
    a, b = LogWriter(experiment.pk, "process:worker-0"), LogWriter(experiment.pk, "process:worker-0")
    a.line("from a")
    a.flush()
    b.line("from b")  # b began before a wrote: its first chunk finds seq 0 taken
    b.flush()
    a.line("a again")
    a.flush()
    assert log_text(experiment.pk, "process:worker-0") == "from a\nfrom b\na again\n"


def test_a_writer_inside_a_transaction_keeps_the_transaction_usable(experiment):
    append_log(experiment.pk, "step:Cloning", "earlier\n")
    with transaction.atomic():
        append_log(experiment.pk, "step:Cloning", "later\n")  # seq 0 is taken: a savepoint absorbs it
        services.record_action(experiment.pk, "still inside the same transaction")
    assert log_text(experiment.pk, "step:Cloning") == "earlier\nlater\n"

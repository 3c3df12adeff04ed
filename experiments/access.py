"""The only way views, consumers and API endpoints fetch a protected experiment (projects:
projects/access.py): 404 for anything the user may not see, and the user's role in its
project, read by the same query."""

import uuid

from django.http import Http404

from experiments.models import Experiment


def get_experiment(user, experiment_id) -> tuple[Experiment, str]:
    try:
        pk = uuid.UUID(str(experiment_id))
    except ValueError:
        raise Http404("No such experiment") from None
    qs = Experiment.objects.for_user(user).select_related("project", "engine", "author")
    try:
        experiment = qs.get(pk=pk)
    except Experiment.DoesNotExist:
        raise Http404("No such experiment") from None
    return experiment, experiment.role

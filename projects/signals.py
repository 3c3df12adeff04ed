"""What the clusters hear of a project's PVC records, without `projects` importing `experiments`
(the ground floor imports nothing above it): experiments' AppConfig.ready() connects the
receivers that talk to the Kubernetes engines (experiments/pvcs.py).

They are sent with `send`, not `send_robust`: a receiver's PvcRefused is the service's answer."""

from django.dispatch import Signal

# Sent with pvc once the record is committed; a PvcRefused removes the record again.
pvc_created = Signal()
# Sent with pvc before the record is deleted; a PvcRefused keeps it (the claim is in use, or
# the cluster could not delete it and a forgotten claim would go on holding storage).
pvc_deleting = Signal()
# Sent with project and pvcs (its records); a receiver returns {record pk: phase}, the phase
# being the cluster's (Pending, Bound, Lost) or one of the receiver's own words, UNREACHABLE
# among them (the page then says which cluster it could not read).
pvc_phases = Signal()
UNREACHABLE = "cluster unreachable"


class PvcRefused(Exception):
    """The cluster side refuses the change; the message says why, for the admin."""

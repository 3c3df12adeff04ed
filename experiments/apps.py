from django.apps import AppConfig


class ExperimentsConfig(AppConfig):
    name = "experiments"

    def ready(self) -> None:
        # PVC records (projects) are created and deleted on the cluster here: projects only
        # sends the signals, since it imports nothing from experiments.
        from experiments import pvcs
        from projects import signals

        signals.pvc_created.connect(pvcs.create_claim, dispatch_uid="experiments.pvcs.create")
        signals.pvc_deleting.connect(pvcs.delete_claim, dispatch_uid="experiments.pvcs.delete")
        signals.pvc_phases.connect(pvcs.claim_phases, dispatch_uid="experiments.pvcs.phases")

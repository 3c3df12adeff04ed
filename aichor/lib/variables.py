"""The environment variable names aichor sets in every workload (SPEC §5). Project variables
and `spec.env` cannot override them; the variables form and the workload both read them here,
so `projects` needs nothing from `experiments`."""

# In the order the experiment page lists them.
AICHOR_VARS = (
    "AICHOR_INPUT_PATH",
    "AICHOR_OUTPUT_PATH",
    "AICHOR_TENSORBOARD_PATH",
    "AICHOR_EXPERIMENT_ID",
    "AICHOR_PROJECT_ID",
    "AICHOR_EXPERIMENT_MESSAGE",
    "VCS_SHA",
    # Older names AIchor still sets, which users' code reads (the TensorBoard path, the message).
    "AICHOR_LOGS_PATH",
    "VCS_COMMIT_MESSAGE",
)
# Set when the buckets are S3: the workload talks to the object storage itself.
STORAGE_VARS = ("S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Per process, from the engine's planning of the process groups.
DISTRIBUTION_VARS = frozenset({
    "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "WORKER_PORT", "WORKER_ADDRS",
    "JAXOPERATOR_COORDINATOR_ADDRESS", "JAXOPERATOR_COORDINATOR_HOST", "JAXOPERATOR_NUM_PROCESSES",
    "JAXOPERATOR_PROCESS_ID", "JOB_COMPLETION_INDEX", "JOB_INDEX", "JOB_GLOBAL_INDEX", "GLOBAL_REPLICAS",
    "REPLICATED_JOB_NAME", "REPLICATED_JOB_REPLICAS", "JOBSET_NAME", "RAY_ADDRESS", "RAY_SERVER", "TF_CONFIG",
})  # fmt: skip

PROTECTED_VARS = frozenset(AICHOR_VARS) | frozenset(STORAGE_VARS) | DISTRIBUTION_VARS

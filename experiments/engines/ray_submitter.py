"""The submitter of a Ray cluster on one host: `ray job submit`, without its lost last lines.

`ray job submit` follows the driver's log through the job server, and Ray's follower stops as
soon as it finds the job ended after a second with no new line: lines the driver wrote in that
second (its final result, typically, printed just before it exits) are never shown. This does
what `ray job submit` does (submit the command as the job's entrypoint, follow its output live,
exit 1 unless the job succeeded), then prints whatever the follower missed from the job's log.

It runs inside the experiment's image, with the image's Ray (the engine passes this file's
text to the Python that `ray` runs on): it may import Ray's public SDK and nothing of aichor.
"""

import asyncio
import os
import sys
import time


def main(entrypoint: str, client_class=None) -> int:
    if client_class is None:
        from ray.job_submission import JobSubmissionClient as client_class
    address = os.environ["RAY_DASHBOARD_ADDRESS"]
    client = client_class(address)
    # The command as the manifest wrote it: the job supervisor's shell runs it whole.
    job = client.submit_job(entrypoint=entrypoint)
    print(f"Job '{job}' submitted to {address}; its output follows.", flush=True)
    shown = asyncio.run(_follow(client, job))
    while not (status := client.get_job_status(job)).is_terminal():
        time.sleep(1)
    sys.stdout.write(client.get_job_logs(job)[shown:])
    print(f"Job '{job}' {status.value.lower()}", flush=True)
    return 0 if status.value == "SUCCEEDED" else 1


async def _follow(client, job: str) -> int:
    """Copy the job's output as it comes; how many characters of its log were shown."""
    shown = 0
    async for chunk in client.tail_job_logs(job):
        sys.stdout.write(chunk)
        sys.stdout.flush()
        shown += len(chunk)
    return shown


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

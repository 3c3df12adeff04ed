"""What the test workloads run (with this interpreter, on the local engine): TensorBoard event
files written with tensorboard's own writer to AICHOR_TENSORBOARD_PATH, uploaded whole after
each flush when that path is on S3 (as TensorBoard's own S3 writer does)."""

import os
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def scalar(tag: str, value: float, step: int) -> event_pb2.Event:
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
    return event_pb2.Event(wall_time=time.time(), step=step, summary=summary)


def tensor_scalar(tag: str, value: float, step: int) -> event_pb2.Event:
    """The TF2 form: a rank-0 float tensor tagged for the scalars plugin."""
    from tensorboard.util import tensor_util

    metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
    value_pb = summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor_util.make_tensor_proto(value))
    return event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=[value_pb]))


def main(first: int, last: int, wait_for: str | None) -> None:
    target = os.environ["AICHOR_TENSORBOARD_PATH"]
    on_s3 = target.startswith("s3://")
    local = Path(tempfile.mkdtemp()) if on_s3 else Path(target)
    runs = {run: EventFileWriter(str(local / run)) for run in ("train", "eval")}

    def publish(close: bool = False) -> None:
        for writer in runs.values():
            writer.close() if close else writer.flush()
        if on_s3:
            import boto3

            bucket, _, prefix = target[5:].partition("/")
            s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
            for path in local.rglob("*tfevents*"):
                s3.upload_file(str(path), bucket, prefix + str(path.relative_to(local)))

    def write(steps: range) -> None:
        for step in steps:
            runs["train"].add_event(scalar("loss", 1.0 / (step + 1), step))
            runs["eval"].add_event(tensor_scalar("accuracy", step / 100, step))
        publish()
        print(f"wrote steps up to {steps[-1]}", flush=True)

    write(range(first, last))
    if wait_for:
        while not Path(wait_for).exists():
            time.sleep(0.1)
        write(range(last, 2 * last))
    publish(close=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)

"""producer: read and validate input files, stage shards on object storage, enqueue shard tasks.

Entry points: `new_job_spec(...)` then `submit_job(spec, enqueue=..., state=...)`.
No torch here; rows reach workers only through staged Parquet shards.
"""

from cola_batch.chat import ChatTemplateError, messages_to_prompt
from cola_batch.producer.errors import InputError, Rejection
from cola_batch.producer.submit import (
    Enqueue,
    JobStateSink,
    NullJobState,
    load_job_spec,
    new_job_spec,
    stage_inputs,
    submit_job,
)

__all__ = [
    "ChatTemplateError",
    "Enqueue",
    "InputError",
    "JobStateSink",
    "NullJobState",
    "Rejection",
    "load_job_spec",
    "messages_to_prompt",
    "new_job_spec",
    "stage_inputs",
    "submit_job",
]

"""Data contracts shared by every package: pydantic models and Arrow schemas. No I/O, no torch."""

from cola_batch.schemas.sampling import SamplingParams

__all__ = ["SamplingParams"]

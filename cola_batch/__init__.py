"""cola-batch: batch generation service for Cola DLM.

Package map (where a row of data goes):
  producer/  read + validate input files, stage shards on object storage, enqueue shard tasks
  worker/    Celery app: load the model once per process, run shards, commit outputs, finalise
  pipeline/  prompts -> tokens -> latents -> block-wise flow-matching generation -> text
  model/     Text VAE + block-causal DiT networks and checkpoint I/O
  schemas/   the data contracts shared by all of the above (no I/O, no torch)
"""

__version__ = "0.1.0"

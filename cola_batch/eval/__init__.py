"""The 8-task Cola DLM benchmark (spec/eval.md): prompt templates, scorer, reports, chat template.

Modules: `templates` (task prompts, §4), `primitives` + `letters` + `scoring` (scorer, §6),
`tasks` (file reading and discovery), `report` (CSV / Markdown), `chat` (messages -> prompt,
inference.md §12.4), `cli` (`cola-batch eval`), `runner` (generation through the queue).
"""

from cola_batch.chat import ChatTemplateError, apply_chat_template
from cola_batch.eval.scoring import TASKS, TaskScore, score_record, score_task
from cola_batch.eval.templates import build_prompt

__all__ = [
    "TASKS",
    "ChatTemplateError",
    "TaskScore",
    "apply_chat_template",
    "build_prompt",
    "score_record",
    "score_task",
]

"""The recipes' names and choices: tasks, record formats and their fields, dtypes, quantisations, what to
do with an over-long record. The data and model modules and the settings read them from here, so that
the settings import no implementation (the library's own constants are `lora_one.core.constants`)."""

from __future__ import annotations

from dataclasses import dataclass

CAUSAL_LM, CLASSIFICATION, SEQ2SEQ = "causal-lm", "classification", "seq2seq"
TASKS = (CAUSAL_LM, CLASSIFICATION, SEQ2SEQ)
DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("4bit", "8bit")
# What to do with a record longer than --max-length tokens.
TOO_LONG = ("truncate", "skip", "error")
PROMPT_RESPONSE, MESSAGES, TEXT, TEXT_LABEL = "prompt-response", "messages", "text", "text-label"
FORMATS = (PROMPT_RESPONSE, MESSAGES, TEXT, TEXT_LABEL)


@dataclass(frozen=True)
class Fields:
    """The names of the fields the formats read, and the format (None: detected from the records)."""

    prompt: str = "prompt"
    response: str = "response"
    text: str = "text"
    label: str = "label"
    messages: str = "messages"
    format: str | None = None

    def of(self, fmt: str) -> tuple[str, ...]:
        return {PROMPT_RESPONSE: (self.prompt, self.response), MESSAGES: (self.messages,), TEXT: (self.text,),
                TEXT_LABEL: (self.text, self.label)}[fmt]

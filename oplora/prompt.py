"""The Alpaca prompt (no input) that PiSSA, MiLoRA and LoRA-Null train and evaluate with."""

PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{query}\n\n### Response:"
)

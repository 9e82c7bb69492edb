"""The data layer: reading and validating adapter directories and uploads (peft_lora, spec), the
registry of task -> version, the on-disk store; and the tools that make adapters (train, evaluate).
The data-layer modules import nothing from runtime/ but its errors, config and family table."""
import os

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")
EXAMPLE_TASKS = ("sst2", "ag_news")

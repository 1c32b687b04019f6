"""`python -m lora_one.toys EXPERIMENT [--out DIR] [--seed S] [--quick]` (same as `lora-one toy ...`)."""

import sys

from lora_one.toys import main

sys.exit(main())

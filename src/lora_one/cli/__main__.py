import sys

from lora_one.cli import main

sys.exit(main())

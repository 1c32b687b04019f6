"""`import lora_one` prints nothing, changes no logger and imports no package of its own beyond PEFT,
which the library needs and which itself imports bitsandbytes (peft/helpers.py, when it is installed),
accelerate and, through transformers, yaml. In fresh processes."""

import json
import os
import subprocess
import sys

# the packages a fresh process holds after importing `module`, and the levels of bitsandbytes' and
# kernels' loggers, written to `path`: the import's own output stays apart
REPORT = """
import json, logging, sys
import {module}
with open({path!r}, "w") as f:
    json.dump({{
        "packages": sorted({{m.split(".")[0] for m in sys.modules}} - set(sys.stdlib_module_names)),
        "levels": {{name: logger.level for name, logger in logging.Logger.manager.loggerDict.items()
                    if isinstance(logger, logging.Logger) and name.startswith(("bitsandbytes", "kernels"))}},
    }}, f)
"""


def imported(module: str, path) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # offline, bitsandbytes' import also warned about a trust check
    done = subprocess.run([sys.executable, "-c", REPORT.format(module=module, path=str(path))], capture_output=True,
                          text=True, env=env, timeout=300, check=True)
    return done, json.loads(path.read_text())


def test_import_prints_nothing_adds_no_package_and_changes_no_logger(tmp_path):
    done, ours = imported("lora_one", tmp_path / "lora_one.json")
    assert (done.stdout, done.stderr) == ("", "")
    assert ours["levels"] == dict.fromkeys(ours["levels"], 0)  # NOTSET, as their packages leave them
    _, peft = imported("peft", tmp_path / "peft.json")
    assert set(ours["packages"]) == {*peft["packages"], "lora_one"}

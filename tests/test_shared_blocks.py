"""Code needed by several scripts is repeated in marked blocks that must stay byte-identical.

offline_pretrain.py holds the canonical copy of every block, except the blocks only the o2o scripts use, whose
canonical copy is in o2o_sac.py (HOME). After editing a block there, propagate it with
    python tests/test_shared_blocks.py --write
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CANONICAL = ROOT / "offline_pretrain.py"
HOME = {"runfolder": ROOT / "o2o_sac.py", "fqe-stop": ROOT / "o2o_sac.py", "results": ROOT / "o2o_sac.py", "phases": ROOT / "o2o_sac.py",
        "constraint": ROOT / "o2o_sac.py", "family": ROOT / "o2o_sac.py"}  # blocks offline_pretrain.py does not use: their canonical copy
BLOCK_RE = re.compile(r"^# --- shared: (?P<name>[\w-]+) ---\n.*?^# --- end shared: (?P=name) ---$", re.S | re.M)
# which blocks each script must carry
REQUIRED = {
    "make_dataset.py": {"utils", "networks", "dataset", "evaluation"},
    "o2o_sac.py": {"utils", "networks", "accel", "dataset", "buffer", "evaluation", "checkpoint", "runfolder", "fqe-stop", "provenance", "results",
                   "tracking", "phases", "constraint", "family"},
    "o2o_td3.py": {"utils", "networks", "accel", "dataset", "buffer", "evaluation", "checkpoint", "runfolder", "fqe-stop", "provenance", "results",
                   "tracking", "phases", "constraint", "family"},
    "o2o_ppo.py": {"utils", "networks", "accel", "dataset", "evaluation", "checkpoint", "runfolder", "provenance", "results", "tracking",
                   "phases", "family"},
}


def blocks(path: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for m in BLOCK_RE.finditer(path.read_text()):
        assert m.group("name") not in found, f"{path.name}: block {m.group('name')} appears twice"
        found[m.group("name")] = m.group(0)
    return found


def canonical() -> dict[str, str]:
    canon = blocks(CANONICAL)
    for name, path in HOME.items():
        assert name not in canon, f"block {name!r} has two canonical copies"
        canon[name] = blocks(path)[name]
    return canon


def test_canonical_has_all_blocks():
    assert set(blocks(CANONICAL)) == {"utils", "networks", "accel", "dataset", "buffer", "evaluation", "checkpoint", "provenance", "tracking"}


@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_blocks_identical(script):
    path = ROOT / script
    if not path.exists():
        pytest.skip(f"{script} not written yet")
    canon, mine = canonical(), blocks(path)
    missing = REQUIRED[script] - set(mine)
    assert not missing, f"{script} lacks shared blocks {sorted(missing)}"
    for name, text in mine.items():
        assert name in canon, f"{script} has a shared block {name!r} that no canonical file defines"
        assert text == canon[name], f"shared block {name!r} of {script} drifted from offline_pretrain.py; run python tests/test_shared_blocks.py --write"


def test_block_regex_catches_drift(tmp_path):
    canon = blocks(CANONICAL)["utils"]
    f = tmp_path / "x.py"
    f.write_text(canon.replace("exit status 2", "exit status two"))
    assert blocks(f)["utils"] != canon


def write_all() -> None:
    canon = canonical()
    for script in REQUIRED:
        path = ROOT / script
        if not path.exists():
            continue
        text = path.read_text()
        new = BLOCK_RE.sub(lambda m: canon[m.group("name")], text)
        if new != text:
            path.write_text(new)
            print(f"updated {script}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_all()
    else:
        sys.exit(pytest.main([__file__, "-q"]))

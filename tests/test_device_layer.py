"""utils/device.py holds the device logic: no other module of the package calls torch.cuda, torch_xla or
torch.distributed (prose that names them is allowed)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALLS = re.compile(r"\btorch\.cuda\.|\bimport torch_xla|\bfrom torch_xla|\btorch_xla\.|\btorch\.distributed\.")


def test_only_utils_device_calls_the_device_libraries():
    sources = [*ROOT.glob("cores/*.py"), *ROOT.glob("utils/*.py"), ROOT / "sampler.py", ROOT / "posterior_sample.py"]
    offenders = []
    for path in sources:
        if path.name == "device.py" and path.parent.name == "utils":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if CALLS.search(code) and not code.lstrip().startswith(("\"", "'", "``")):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert len(sources) > 10
    assert offenders == [], "\n".join(offenders)

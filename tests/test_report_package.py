"""The report package's promise: it imports without torch, so a report is made and checked anywhere."""

import pkgutil
import subprocess
import sys

import noisynn.report


def test_every_report_module_imports_with_torch_unimportable():
    modules = sorted(f"noisynn.report.{m.name}" for m in pkgutil.iter_modules(noisynn.report.__path__))
    assert {"noisynn.report.stats", "noisynn.report.tables", "noisynn.report.summary"} <= set(modules)
    # a finder ahead of all others refuses torch and timm, as on a machine without them
    code = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'timm', 'torchvision'):\n"
            "            raise ImportError(f'{name} is not installed here')\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            + "".join(f"import {m}\n" for m in modules)
            + "assert 'torch' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr

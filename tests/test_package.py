import subprocess
import sys

import opdlm_trl


def test_public_names_resolve():
    for name in opdlm_trl.__all__:
        assert getattr(opdlm_trl, name) is not None, name
    assert opdlm_trl.OPDLMTrainer.__name__ == "OPDLMTrainer"


def test_core_import_does_not_pull_trl():
    """Converting and sampling need only torch + transformers; the trainers load TRL on first use."""
    code = "import sys, opdlm_trl; assert 'trl' not in sys.modules, 'trl imported'; opdlm_trl.OPDLMConfig; assert 'trl' in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
